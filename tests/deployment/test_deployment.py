"""A real Flower deployment on loopback (cnfgnn/deploy/launcher.py): SuperLink + SuperNodes +
``flwr run``.

Marked ``deployment`` (``make test-deployment``): each test starts real processes and takes
a minute or two on 2 cores. Every deployment runs inside ``Deployment``'s context manager,
which stops exactly the process groups it started, also when the test fails; the
``no_leftovers`` fixture (conftest.py) then checks that no process still refers to the test's
directory.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from cnfgnn.deploy import launcher as deploy
from cnfgnn.experiment import run_experiment
from cnfgnn.procs import cmdline_of
from cnfgnn.results import read_predictions
from tests.helpers import (
    TINY,
    kill_server,
    kill_superlink,
    kill_supernode,
    make_cfg,
    restart_supernode,
)

pytestmark = pytest.mark.deployment

METRICS = ("rmse", "mae", "masked_mae", "masked_rmse", "masked_mae_h3", "masked_rmse_h12")
# TINY as 3 SuperNodes of 2 sensors, 2 server steps per round (few round trips)
DEPLOY = (
    *TINY,
    "dataset.days=2",
    "federation.nodes_per_client=2",
    "federation.server_batch_size=196",
)
RUN_TIMEOUT_S = 900.0


def _deploy(overrides, run_dir: Path, on_tick=None) -> deploy.RunResult:
    result = deploy.deploy_experiment(
        list(overrides), run_dir=run_dir, progress=print, on_tick=on_tick, timeout_s=RUN_TIMEOUT_S
    )
    assert result.info["leftover_pids"] == []
    return result


_INPROCESS: dict[tuple[str, ...], dict] = {}  # the same reference run is reused


def _inprocess(overrides, tmp_path: Path) -> dict:
    key = tuple(overrides)
    if key not in _INPROCESS:
        cfg = make_cfg(*overrides, "engine=inprocess", f"output_root={tmp_path}")
        final, _ = run_experiment(cfg, run_dir=tmp_path / "inprocess", progress=lambda s: None)
        _INPROCESS[key] = final
    return _INPROCESS[key]


def _rounds_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _assert_same_test_metrics(final: dict, ref: dict) -> None:
    for key in METRICS:
        assert final["test"][key] == pytest.approx(ref["test"][key], rel=1e-5, abs=1e-6), key


def test_demo_completes_and_equals_an_inprocess_run(tmp_path):
    overrides = [f"experiment={deploy.DEMO_EXPERIMENT}"]
    result = _deploy(overrides, tmp_path / "deploy")
    final = result.final
    assert result.attempts == 1 and final["failures"] == []
    assert final["rounds_run"] == 2 and final["engine"] == "deployment"
    assert final["nodes"] == {"total": 12, "train": 12, "clients": 3}
    log = (tmp_path / "deploy" / "logs" / "flwr_run.log").read_text()
    assert "round   2" in log  # the ServerApp's progress streamed into the run directory
    for i in range(3):  # each SuperNode read its own shard and answered
        assert "completed" in (tmp_path / "deploy" / "logs" / f"supernode_{i}.log").read_text()
    assert result.info["startup_s"] > 0 and len(result.info["memory_peak_mb"]) >= 4
    assert "SuperNodes" in deploy.report(result)
    # the test forecasts stayed on the sites' own disks (their state dirs), none reached the server
    kept = sorted(
        p.stem for p in (tmp_path / "deploy" / "node_state").glob("*/node_store/forecasts/*.npz")
    )
    assert kept == sorted(final["predictions"]["sensors"]) and kept
    assert final["predictions"]["released_to_server"] is False
    assert read_predictions(tmp_path / "deploy") is None
    _assert_same_test_metrics(final, _inprocess(overrides, tmp_path))


def test_a_killed_supernode_does_not_stop_the_run(tmp_path):
    run_dir = tmp_path / "deploy"
    killed: dict[str, float] = {}

    def kill_after_round_1(dep: deploy.Deployment) -> None:
        if not killed and _rounds_logged(run_dir) >= 1:
            kill_supernode(dep, 2)
            killed["at"] = time.monotonic()

    result = _deploy([*DEPLOY, "federation.rounds=3"], run_dir, kill_after_round_1)
    final = result.final
    assert killed and final["rounds_run"] == 3 and result.attempts == 1
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    lost_ids = manifest["clients"][2]["sensor_ids"]
    assert final["failures"], "the dead SuperNode's client was never reported"
    assert {f["client"] for f in final["failures"]} == {2}
    assert all(f["round"] >= 2 and f["sensors"] == lost_ids for f in final["failures"])
    assert result.info["lost"]["2"]["sensors"] == lost_ids
    assert all(math.isfinite(final["test"][k]) for k in METRICS)
    per_node = json.loads((run_dir / "final.json").read_text())["test_rmse_per_node"]
    assert {s for s, v in per_node.items() if v is None} == set(lost_ids)  # no answer: null
    report = deploy.report(result)
    assert "client 2 lost from round 2" in report and lost_ids[0] in report


def test_a_restarted_supernode_rejoins_under_its_partition(tmp_path):
    run_dir = tmp_path / "deploy"
    done: dict[str, float] = {}

    def restart_after_round_1(dep: deploy.Deployment) -> None:
        if not done and _rounds_logged(run_dir) >= 1:
            kill_supernode(dep, 1)
            done["restart_s"] = restart_supernode(dep, 1)

    result = _deploy([*DEPLOY, "federation.rounds=3"], run_dir, restart_after_round_1)
    final = result.final
    assert done and final["rounds_run"] == 3 and result.attempts == 1
    # at most the phases of round 2 before it came back were lost; round 3 and test had it
    assert all(f["client"] == 1 and f["round"] == 2 for f in final["failures"])
    assert all(math.isfinite(v) for v in final["test_rmse_per_node"].values())
    log = (run_dir / "logs" / "flwr_run.log").read_text()
    # the identify handshake re-mapped partition 1 to the new SuperNode's node id
    assert "client 1 rejoined as node" in log or "client 1 is now node" in log
    node_log = (run_dir / "logs" / "supernode_1.log").read_text()
    after_restart = node_log.rsplit("start supernode_1", 1)[1]
    assert "completed" in after_restart  # the new process answered messages


def test_a_killed_superlink_resumes_from_the_checkpoint_to_the_same_result(tmp_path):
    run_dir = tmp_path / "deploy"
    killed: dict[str, bool] = {}

    def kill_after_checkpoint(dep: deploy.Deployment) -> None:
        if not killed and _rounds_logged(run_dir) >= 1 and (run_dir / "checkpoint.pt").exists():
            kill_superlink(dep)
            killed["yes"] = True

    overrides = [*DEPLOY, "federation.rounds=2"]
    result = _deploy(overrides, run_dir, kill_after_checkpoint)
    assert killed and result.attempts == 2
    assert result.info["restarts"] == [{"superlink": True, "supernodes": [0, 1, 2]}]
    rounds = [
        json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert rounds == [1, 2]
    assert "resumed after round 1" in (run_dir / "logs" / "flwr_run.log").read_text()
    _assert_same_test_metrics(result.final, _inprocess(overrides, tmp_path))


def test_a_killed_serverapp_resumes_on_the_same_superlink(tmp_path):
    """Only the ServerApp process dies: Flower marks the run failed, the launcher submits it
    again (same SuperLink and SuperNodes) and it continues after round 1."""
    run_dir = tmp_path / "deploy"
    killed: dict[str, list[int]] = {}

    def kill_after_checkpoint(dep: deploy.Deployment) -> None:
        if not killed and _rounds_logged(run_dir) >= 1 and (run_dir / "checkpoint.pt").exists():
            killed["pids"] = kill_server(dep)

    overrides = [*DEPLOY, "federation.rounds=2"]
    result = _deploy(overrides, run_dir, kill_after_checkpoint)
    assert killed["pids"] and result.attempts == 2
    assert result.info["restarts"] == [{"superlink": False, "supernodes": []}]
    assert "resumed after round 1" in (run_dir / "logs" / "flwr_run.log").read_text()
    _assert_same_test_metrics(result.final, _inprocess(overrides, tmp_path))


def _descendants_and_groups(root: int) -> dict[int, int]:
    """``{pid: start time}`` of ``root``'s descendants and every member of their process
    groups (the launcher starts each Flower process as a group of its own)."""
    import os

    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                f = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(f[1]), int(f[2]), int(f[19]))  # ppid, pgrp, start
    tree, grown = {root}, True
    while grown:
        kids = {p for p, (ppid, _, _) in table.items() if ppid in tree} - tree
        tree |= kids
        grown = bool(kids)
    groups = {table[p][1] for p in tree if p in table} - {os.getpgrp()}
    pids = tree | {p for p, v in table.items() if v[1] in groups}
    return {p: table[p][2] for p in pids if p in table}


def test_an_interrupted_launcher_leaves_no_process_behind(tmp_path):
    """Ctrl-C (SIGINT) to ``python -m cnfgnn.deploy`` in the middle of a run: it exits
    with 130 after stopping the SuperLink, the SuperNodes, their workers, the ServerApp and
    ``flwr run``: none of the processes it had started is alive afterwards."""
    import os
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "deploy"
    out = tmp_path / "launcher.out"
    with open(out, "wb") as f:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cnfgnn.deploy",
                "run",
                "--run-dir",
                str(run_dir),
                *DEPLOY,
                "federation.rounds=3",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=deploy.flower_env(),
            start_new_session=True,
            # SIGINT as from a terminal, also when the tests run in a background job (which
            # inherits SIGINT ignored, and the launcher would then run to its end)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # mid-run: the ServerApp is up and has begun the experiment
        while "engine=deployment" not in _text(run_dir / "logs" / "flwr_run.log"):
            assert launcher.poll() is None, out.read_text()[-2000:]
            assert time.monotonic() < deadline, "the run never started"
            seen.update(_descendants_and_groups(launcher.pid))
            time.sleep(0.5)
        time.sleep(5.0)
        seen.update(_descendants_and_groups(launcher.pid))
        names = " ".join(cmdline_of(p) for p in seen)
        assert "flower-superlink" in names and "cnfgnn.deploy.supernode" in names
        assert "cnfgnn.deploy.clientworker" in names and "flwr run" in names
        launcher.send_signal(signal.SIGINT)
        code = launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:  # the launcher hung: stop what it started, then fail
            for pid, start in seen.items():
                if _start_time(pid) == start:
                    os.kill(pid, signal.SIGKILL)
    assert code == 130, out.read_text()[-2000:]
    assert "interrupted" in out.read_text()
    time.sleep(1.0)
    alive = [p for p, start in seen.items() if p != launcher.pid and _start_time(p) == start]
    assert alive == [], [cmdline_of(p) for p in alive]
    info = json.loads((run_dir / "logs" / "deployment.json").read_text())
    assert info["leftover_pids"] == []


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _start_time(pid: int) -> int | None:
    """Start time (clock ticks) of a live, non-zombie ``pid``; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])
