"""``engine=simulation`` joining an existing Ray cluster (``engine.ray.address``).

The fast tests check the backend config and the refusal of an unreachable address. The slow
one starts a one-node cluster (``ray start --head --block``) through a ProcessSet, runs
``cnfgnn engine=simulation engine.ray.address=...`` as a separate process, reads the
cluster's job and actor tables afterwards (a simulation that started its own Ray leaves no
trace there), and stops the cluster by the pid of ``ray start``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from cnfgnn.api import run_experiment
from cnfgnn.deploy.launcher import free_ports, port_open
from cnfgnn.flower import ray_cluster
from cnfgnn.flower.simulation import backend_config
from cnfgnn.procs import ProcessSet, cnfgnn_run_command, group_members
from cnfgnn.shell import UsageError
from tests.helpers import ROOT, TINY, make_cfg

HOST = "127.0.0.1"
#: A 4-sensor, 2-day run in 2 clients of 2 sensors, one round.
SMALL = (
    *TINY,
    "dataset.num_nodes=4",
    "dataset.days=2",
    "federation.rounds=1",
    "federation.nodes_per_client=2",
    "engine=simulation",
)
HEAD_START_S = 120  # `ray start --head` up (about 6 s on an idle 2-core machine)
RUN_TIMEOUT_S = 600
STOP_S = 30  # `ray start --block` and its children gone after SIGTERM (about 2 s measured)
#: Printed by a separate driver: the cluster's jobs (driver pid, finished?) and actors.
TABLES = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
jobs = [{"job": j["JobID"], "pid": j["DriverPid"], "dead": j["IsDead"]} for j in state.jobs()]
actors = [{"job": a["JobID"], "cls": a["ActorClassName"]} for a in state.actors().values()]
print("TABLES " + json.dumps({"jobs": jobs, "actors": actors}))
"""


def test_backend_config_joins_a_cluster_without_node_level_init_args():
    private = backend_config(make_cfg("engine=simulation"))
    assert private["init_args"]["num_cpus"] == 2 and "address" not in private["init_args"]
    assert private["init_args"]["_system_config"]["max_direct_call_object_size"] == 4 * 2**20
    joined = backend_config(make_cfg("engine=simulation", "engine.ray.address=10.0.0.1:6379"))
    assert joined["init_args"] == {
        "address": "10.0.0.1:6379",
        "logging_level": private["init_args"]["logging_level"],
        "log_to_driver": private["init_args"]["log_to_driver"],
    }
    assert joined["client_resources"] == private["client_resources"]  # per actor, from the pool
    with pytest.raises(UsageError, match="client_resources.num_gpus"):
        backend_config(make_cfg("engine=simulation", "engine.ray.address=auto", "device=cuda"))


def test_unreachable_address_fails_at_once_naming_the_key(tmp_path):
    port = free_ports(1, HOST)[0]  # nobody listens there
    cfg = make_cfg(
        *SMALL,
        f"output_root={tmp_path}",
        f"engine.ray.address={HOST}:{port}",
        "engine.ray.connect_timeout_s=1",
    )
    t0 = time.monotonic()
    with pytest.raises(ray_cluster.ClusterUnreachable) as err:
        run_experiment(cfg, progress=lambda s: None)
    assert time.monotonic() - t0 < 30  # ray.init alone retries for minutes
    message = str(err.value)
    assert f"engine.ray.address={HOST}:{port}" in message and "ray start --head" in message
    assert isinstance(err.value, UsageError)  # the CLI prints it in one line, exit status 2


def test_client_refuses_to_start_over_when_its_saved_state_is_not_on_this_node(
    tmp_path, monkeypatch, task_identity
):
    """On a cluster whose nodes do not share ``engine.state_root`` a client's next message
    can land on a node without its state: an error, not a silently fresh model."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from cnfgnn.config import RUN_CONFIG_KEY, overrides_for
    from cnfgnn.federation import protocol as P
    from cnfgnn.flower import client_app
    from cnfgnn.flower.codec import pack

    monkeypatch.setenv("CNFGNN_STATE_ROOT", str(tmp_path / "state"))  # empty: another node
    cfg = make_cfg(*SMALL, f"output_root={tmp_path}")
    state = RecordDict({client_app.STATE_RECORD: ConfigRecord({client_app.VERSION: 3})})
    ctx = Context(
        run_id=task_identity,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=state,
        run_config={RUN_CONFIG_KEY: overrides_for(cfg, tmp_path)},
    )
    msg = Message(pack({}), dst_node_id=7, message_type=P.HELLO)
    try:
        with pytest.raises(RuntimeError, match="engine.state_root"):
            client_app.app(msg, ctx)
    finally:
        client_app._WORKERS.clear()


def _head_env() -> dict[str, str]:
    """The cluster's environment: cnfgnn importable (as if installed on the node), none of
    the run's own variables (those must reach the actors through the job's runtime_env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNFGNN_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _wait_for_head(procs: ProcessSet, port: int) -> None:
    head = procs.procs["head"]
    deadline = time.monotonic() + HEAD_START_S
    while time.monotonic() < deadline:
        text = head.log_path.read_text(errors="replace")
        if "Ray runtime started" in text and port_open(HOST, port):
            return
        assert head.alive(), f"ray start exited ({head.popen.poll()}): {text[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"ray start not up in {HEAD_START_S} s; see {head.log_path}")


def _stop_head_by_pid(procs: ProcessSet) -> list[int]:
    """SIGTERM to the ``ray start --block`` process only; returns the pids of its process
    tree (recorded before the signal) still alive after ``STOP_S`` seconds."""
    head = procs.procs["head"]
    tree = [head.pid] + [c.pid for c in psutil.Process(head.pid).children(recursive=True)]
    assert len(tree) > 2, "ray start has no children (gcs_server, raylet)"
    os.kill(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_S
    left = tree
    while left and time.monotonic() < deadline:
        head.popen.poll()  # reap the leader
        left = [p for p in tree if psutil.pid_exists(p) and _not_zombie(p)]
        time.sleep(0.1)
    return left


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_simulation_runs_on_a_joined_ray_cluster(tmp_path):
    # Ray's socket paths (<temp>/session_<time>_<pid>/sockets/...) must stay under 107 bytes
    ray_temp = Path(tempfile.mkdtemp(prefix="ray"))
    port, client_port, agent_port = free_ports(3, HOST)
    procs = ProcessSet(tmp_path / "logs", _head_env())
    try:
        procs.start(
            "head",
            [
                Path(sys.executable).parent / "ray",
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=2",
                f"--temp-dir={ray_temp}",
                "--include-dashboard=false",
                f"--ray-client-server-port={client_port}",
                f"--dashboard-agent-listen-port={agent_port}",
            ],
        )
        _wait_for_head(procs, port)
        address = f"{HOST}:{port}"
        run_dir = tmp_path / "run"
        state = tmp_path / "state"
        procs.start(
            "run",
            cnfgnn_run_command(
                [*SMALL, f"engine.ray.address={address}", "engine.keep_node_state=true"],
                run_dir,
            ),
            env={"CNFGNN_STATE_ROOT": str(state), "MPLBACKEND": "Agg"},
        )
        lines: list[str] = []
        code, _ = procs.follow("run", lines.append, timeout_s=RUN_TIMEOUT_S)
        assert code == 0, "".join(lines[-60:])
        assert "joined the Ray cluster" in "".join(lines)

        final = json.loads((run_dir / "final.json").read_text())
        assert final["engine"] == "simulation" and final["nodes"]["clients"] == 2
        assert final["failures"] == []
        assert final["test"] and all(math.isfinite(v) for v in final["test"].values())
        # the actors kept their state under the driver's state root (sent in runtime_env)
        assert list(state.glob("*/client_*/v*.pt")), "no client state under the run's root"

        tables = subprocess.run(
            [sys.executable, "-c", TABLES, address],
            env=_head_env(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        found = [ln for ln in tables.stdout.splitlines() if ln.startswith("TABLES ")]
        assert found, tables.stdout + tables.stderr[-3000:]
        seen = json.loads(found[0].removeprefix("TABLES "))
        driver = [j for j in seen["jobs"] if j["pid"] == procs.procs["run"].pid]
        assert len(driver) == 1 and driver[0]["dead"], seen["jobs"]
        actors = [a for a in seen["actors"] if a["job"] == driver[0]["job"]]
        assert any(a["cls"] == "ClientAppActor" for a in actors), seen["actors"]
        logs = ray_temp / "session_latest" / "logs"
        assert list(logs.glob(f"python-core-driver-*_{procs.procs['run'].pid}.log"))

        left = _stop_head_by_pid(procs)
        assert left == [], f"still alive after SIGTERM to ray start: {left}"
        assert group_members(procs.procs["head"].pgid) == []
    finally:
        procs.stop_all()  # on failure too: SIGTERM, then SIGKILL, to each group started here
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert procs.leftovers() == []
