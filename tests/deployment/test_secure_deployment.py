"""``engine.launch.secure=true``: a real loopback deployment with TLS and SuperNode
authentication (Flower's own mechanisms). The registered SuperNodes join and a round runs;
SuperNodes with an unregistered key, with no key, or speaking plain HTTP are refused and never
listed by the SuperLink. Marked ``deployment`` (``make test-deployment``)."""

from __future__ import annotations

import http.client
import socket
import ssl
import time

import pytest

from cnfgnn.deploy import certs
from cnfgnn.deploy import launcher as deploy
from cnfgnn.procs import ProcessSet
from tests.helpers import TINY, kill_supernode, restart_supernode

pytestmark = pytest.mark.deployment

# TINY as 2 SuperNodes of 3 sensors, 1 round, 2 server steps per round
SECURE = (
    *TINY,
    "dataset.days=2",
    "federation.nodes_per_client=3",
    "federation.server_batch_size=196",
    "federation.rounds=1",
    "engine.launch.secure=true",
)
REFUSAL_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 600.0


def _wait_exited(dep: deploy.Deployment, names: list[str], timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not dep.procs.procs[n].alive() for n in names):
            break
        time.sleep(0.2)
    return {n: dep.procs.procs[n].popen.poll() for n in names}


def _online_ids(dep: deploy.Deployment) -> dict[int, str]:
    return {int(n["node-id"]): n["status"] for n in dep.list_supernodes()}


def test_only_registered_supernodes_join_a_secure_deployment(tmp_path):
    t0 = time.monotonic()
    run_dir = tmp_path / "deploy"
    overrides = list(SECURE)
    cfg = deploy.compose(overrides)
    setup = ProcessSet(run_dir / "logs", deploy.flower_env())
    try:
        deploy.write_shards(overrides, run_dir / "shards", 3, setup)
    finally:
        setup.stop_all()
    with deploy.Deployment(cfg, run_dir, run_dir / "shards", progress=print) as dep:
        startup = dep.start()
        ca = dep.certs.ca_cert
        link_log = (run_dir / "logs" / "superlink.log").read_text()
        assert f"running on https://127.0.0.1:{dep.link_port}" in link_log
        members = _online_ids(dep)
        assert len(members) == 2 and set(members.values()) == {"online"}

        # TLS: the SuperLink's port answers only TLS, with a certificate the CA vouches for
        ctx = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection((dep.host, dep.link_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=dep.host) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        plain = http.client.HTTPConnection(dep.host, dep.link_port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("POST", "/v1/fleet/register-node", body=b"")
            plain.getresponse().read()
        plain.close()

        # three SuperNodes that must not join
        rogue = certs.write_node_key(tmp_path / "rogue_key")  # a valid key, never registered
        ports = deploy.free_ports(3, dep.host)
        base = [
            deploy.BIN / "flower-supernode",
            "--superlink",
            f"{dep.host}:{dep.link_port}",
            "--node-config",
            "partition-id=0 num-partitions=2",
        ]
        intruders = {
            "intruder_unregistered_key": [
                *base,
                "--root-certificates",
                ca,
                "--auth-supernode-private-key",
                rogue,
                "--port",
                ports[0],
            ],
            "intruder_no_key": [*base, "--root-certificates", ca, "--port", ports[1]],
            "intruder_plain_http": [
                *base,
                "--insecure",
                "--port",
                ports[2],
                "--max-retries",
                "2",
                "--max-wait-time",
                "20",
            ],
        }
        t_refuse = time.monotonic()
        for name, argv in intruders.items():
            dep.procs.start(name, argv)
        codes = _wait_exited(dep, list(intruders), REFUSAL_TIMEOUT_S)
        refuse_s = time.monotonic() - t_refuse
        assert all(c is not None and c != 0 for c in codes.values()), codes
        logs = {n: (run_dir / "logs" / f"{n}.log").read_text() for n in intruders}
        assert "[code: 2004] Failed to activate SuperNode" in logs["intruder_unregistered_key"]
        assert "must be registered" in logs["intruder_no_key"]
        assert "SuperNode ID:" not in "".join(logs.values())  # none was given a node id
        link_log = (run_dir / "logs" / "superlink.log").read_text()
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in link_log
        assert '"POST /v1/fleet/register-node HTTP/1.1" 412' in link_log
        assert _online_ids(dep) == members  # the SuperLink lists the registered two only

        # the registered SuperNodes (with the warm ClientApp worker) run a round
        result = dep.run(overrides, timeout_s=RUN_TIMEOUT_S)
    final = result.final
    assert result.attempts == 1 and final["failures"] == [] and final["rounds_run"] == 1
    assert final["nodes"]["clients"] == 2 and final["engine"] == "deployment"
    for i in range(2):
        assert "completed" in (run_dir / "logs" / f"supernode_{i}.log").read_text()
    assert dep.info["leftover_pids"] == [] and dep.info["secure"]
    print(
        f"secure deployment: start-up {startup:.1f} s (key registration "
        f"{dep.info['register_s'][0]:.1f} s), refusals {refuse_s:.1f} s, round "
        f"{result.info['seconds_per_round'][0]:.1f} s, test {time.monotonic() - t0:.1f} s"
    )


def test_a_crashed_supernode_rejoins_a_secure_deployment_with_its_key(tmp_path):
    """SIGKILL SuperNode 1 and start it again at once: the SuperLink refuses its key while it
    still counts the dead process online; the launcher retries until it is let back in, under
    the node id its registered key has."""
    t0 = time.monotonic()
    run_dir = tmp_path / "deploy"
    overrides = list(SECURE)
    setup = ProcessSet(run_dir / "logs", deploy.flower_env())
    try:
        deploy.write_shards(overrides, run_dir / "shards", 3, setup)
    finally:
        setup.stop_all()
    with deploy.Deployment(
        deploy.compose(overrides), run_dir, run_dir / "shards", progress=print
    ) as dep:
        dep.start()
        before = _online_ids(dep)
        kill_supernode(dep, 1)
        restart_s = restart_supernode(dep, 1)
        after = _online_ids(dep)
    assert set(after) == set(before) and set(after.values()) == {"online"}
    node_log = (run_dir / "logs" / "supernode_1.log").read_text()
    attempts = node_log.count("start supernode_1:") - 1
    assert "SuperNode ID:" in node_log.rsplit("start supernode_1:", 1)[1]
    print(
        f"secure rejoin: {restart_s:.1f} s, {attempts} start(s), test {time.monotonic() - t0:.1f} s"
    )
