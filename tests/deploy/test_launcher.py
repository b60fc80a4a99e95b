"""cnfgnn/deploy/ without starting Flower: process groups, the SuperLink connection entry, the
SuperNode command lines, the run summary, and the Flower internals that
cnfgnn/deploy/fastwaits.py patches
(these tests fail loudly when a Flower upgrade moves them)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.shards import write_shards
from cnfgnn.deploy import launcher as deploy
from cnfgnn.deploy.fastwaits import _ScaledTime, check_targets
from cnfgnn.procs import ROOT, ProcessSet, group_members
from tests.helpers import TINY


def test_fastwaits_targets_exist_in_the_installed_flower():
    check_targets()  # raises PatchError naming what moved


def test_fastwaits_patch_rebinds_only_the_supernode_waits():
    code = (
        "import time\n"
        "from cnfgnn.deploy.fastwaits import Waits, patch_supernode\n"
        "changed = patch_supernode(Waits(0.05, 0.01, 0.02, 12))\n"
        "import flwr.supernode.start_client_internal as sci, flwr.supercore.heartbeat as hb\n"
        "import flwr.supernode.fleet_http_connection as fhc\n"
        "t = time.perf_counter(); sci.time.sleep(3); dt = time.perf_counter() - t\n"
        "assert dt < 1.0, dt\n"
        "assert sci.time.monotonic() > 0 and time.sleep is not sci.time.sleep\n"
        "assert sci.pull_objects.keywords == {'initial_backoff': 0.02}\n"
        "assert hb.HEARTBEAT_DEFAULT_INTERVAL == fhc.HEARTBEAT_DEFAULT_INTERVAL == 12.0\n"
        "print(sorted(changed))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "heartbeat_s" in out.stdout and "idle_poll_s" in out.stdout


def test_scaled_time_changes_only_the_listed_durations():
    t = _ScaledTime({3: 0.0, 0.5: 0.0})
    t0 = time.perf_counter()
    t.sleep(3)
    t.sleep(0.5)
    assert time.perf_counter() - t0 < 0.5
    t0 = time.perf_counter()
    t.sleep(0.2)  # not a Flower literal: unchanged
    assert time.perf_counter() - t0 >= 0.19
    assert t.time() == pytest.approx(time.time(), abs=1.0)


def test_idle_poll_is_short_only_shortly_after_a_message():
    t = _ScaledTime({3: 0.3, 0.5: 0.0}, hot=0.0, hot_s=10.0)
    t0 = time.perf_counter()
    t.sleep(3)  # no message handled yet: the idle pause
    assert time.perf_counter() - t0 >= 0.29
    t.sleep(0.5)  # a message was handled (waiting for the ClientApp's reply)
    t0 = time.perf_counter()
    t.sleep(3)  # within hot_s of it: the hot pause
    assert time.perf_counter() - t0 < 0.2


def test_process_set_stops_the_whole_group_and_nothing_else(tmp_path):
    outsider = subprocess.Popen(["sleep", "60"])  # not ours: must survive
    procs = ProcessSet(tmp_path, {"PATH": "/usr/bin:/bin"})
    try:
        proc = procs.start("tree", ["sh", "-c", "sleep 60 & sleep 60 & wait"])
        deadline = time.monotonic() + 5
        while len(group_members(proc.pgid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(group_members(proc.pgid)) == 3  # sh + two children
        procs.kill("tree")
        assert procs.leftovers() == []
        procs.start("again", ["sleep", "60"])
        procs.stop_all(grace_s=5)
        assert procs.leftovers() == []
        assert outsider.poll() is None
        assert "start tree" in (tmp_path / "tree.log").read_text()
    finally:
        procs.stop_all(grace_s=1)
        outsider.kill()
        outsider.wait()


def test_connection_entry_is_read_by_flower_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    from flwr.cli.flower_config import read_superlink_connection

    name = deploy.ensure_connection(tmp_path, "127.0.0.1:45678")
    assert deploy.ensure_connection(tmp_path, "127.0.0.1:45678") == name  # written once
    conn = read_superlink_connection(name)
    assert conn.address == "127.0.0.1:45678" and conn.insecure
    assert (tmp_path / "config.toml").read_text().count(f"[superlink.{name}]") == 1
    deploy.remove_connection(tmp_path, name)
    assert name not in (tmp_path / "config.toml").read_text()
    assert read_superlink_connection("local").address == ":local:"


@pytest.fixture
def tiny_shards(tmp_path):
    from tests.helpers import make_cfg

    cfg = make_cfg(*TINY)
    return write_shards(load_dataset(cfg.dataset), tmp_path / "shards", 2)


def test_supernode_command_lines(tmp_path, tiny_shards, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    cfg = deploy.compose(list(TINY))
    dep = deploy.Deployment(cfg, tmp_path / "run", tiny_shards, progress=lambda s: None)
    try:
        assert dep.num_nodes == 3 and len(set(dep.node_ports + [dep.link_port])) == 4
        argv = dep.supernode_argv(2)
        assert argv[1:3] == ["-m", "cnfgnn.deploy.supernode"] and "--warm-worker" in argv
        flower = argv[argv.index("--") + 1 :]
        assert flower[flower.index("--superlink") + 1] == f"127.0.0.1:{dep.link_port}"
        assert flower[flower.index("--port") + 1] == str(dep.node_ports[2])
        node_config = flower[flower.index("--node-config") + 1]
        assert "partition-id=2 num-partitions=3" in node_config
        assert f'data-dir="{tiny_shards / "client_0002"}"' in node_config
        assert "--heartbeat-s" in argv and "--idle-poll-s" in argv
    finally:
        dep.stop()
    cfg = deploy.compose(
        [
            *TINY,
            "engine.launch.worker=flower",
            "engine.launch.fast_waits=false",
            "engine.launch.heartbeat_s=null",
        ]
    )
    dep = deploy.Deployment(cfg, tmp_path / "run2", tiny_shards, progress=lambda s: None)
    try:
        argv = dep.supernode_argv(0)
        assert argv[0].endswith("flower-supernode")  # Flower's own entry point, untouched
        assert "--isolation" not in argv
    finally:
        dep.stop()


def test_summary_names_the_lost_sensors(tmp_path):
    final = {
        "round_trips": {"train.split": 4},
        "round_trip_seconds": {"train.split": 2.0},
        "failures": [
            {
                "round": 2,
                "phase": "local",
                "client": 1,
                "reason": "node unavailable",
                "sensors": ["s2", "s3"],
            },
            {
                "round": 2,
                "phase": "encode",
                "client": 1,
                "reason": "client not connected",
                "sensors": ["s2", "s3"],
            },
        ],
    }
    info = deploy.summarize(tmp_path, final)
    assert info["round_trip_s"] == {"train.split": 0.5}
    assert info["lost"] == {
        "1": {
            "sensors": ["s2", "s3"],
            "first_round": 2,
            "first_phase": "local",
            "count": 2,
            "reason": "node unavailable",
        }
    }
