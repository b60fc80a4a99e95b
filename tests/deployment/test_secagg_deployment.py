"""SecAgg+ in a real loopback deployment (``privacy.secagg=true``, docs/privacy.md).

Marked ``deployment`` (``make test-deployment``); processes are stopped as in
test_deployment.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cnfgnn.deploy import launcher as deploy
from tests.helpers import TINY, kill_supernode

pytestmark = pytest.mark.deployment

# TINY as 3 SuperNodes of 2 sensors, DP with the FedAvg phase through SecAgg+
SECAGG = (
    *TINY,
    "dataset.days=2",
    "federation.nodes_per_client=2",
    "federation.server_batch_size=196",
    "privacy=dp",
    "federation.scaling=per_node",
    "privacy.secagg=true",
)


def _deploy(overrides, run_dir: Path, on_tick=None) -> deploy.RunResult:
    result = deploy.deploy_experiment(
        list(overrides), run_dir=run_dir, progress=print, on_tick=on_tick, timeout_s=900.0
    )
    assert result.info["leftover_pids"] == []
    return result


def test_secagg_deployment_completes_and_sends_no_individual_update(tmp_path):
    result = _deploy([*SECAGG, "federation.rounds=2"], tmp_path / "deploy")
    final = result.final
    assert final["failures"] == [] and final["rounds_run"] == 2
    assert final["privacy"]["fedavg"]["secagg"] is True
    assert final["privacy"]["fedavg"]["rounds_answered_asked"] == [[6, 6], [6, 6]]
    assert "train.local" not in final["wire_bytes"] and final["wire_bytes"]["train"]["up"] > 0
    assert final["round_trips"]["train"] == 8  # 4 SecAgg+ stages per round
    assert all(math.isfinite(final["test"][k]) for k in ("rmse", "mae"))


def test_a_supernode_killed_in_the_secagg_phase_does_not_stop_the_round(tmp_path):
    """SuperNode 2 stalls in the masked-vector stage of round 1 and is SIGKILLed there; the
    workflow's stage timeout drops it, its masks are rebuilt from its neighbours' shares,
    and the round completes with 4 of 6 nodes in the sum."""
    marker = tmp_path / "in_masked_stage"
    run_dir = tmp_path / "deploy"
    killed = {}

    def kill_in_phase(dep: deploy.Deployment) -> None:
        if not killed and marker.exists():
            kill_supernode(dep, 2)
            killed["yes"] = True

    fault = (
        f"++engine.fault={{partition:2,message_type:train,mode:sleep,seconds:600,"
        f"marker:'{marker}'}}"
    )
    result = _deploy(
        [*SECAGG, "federation.rounds=1", "engine.timeout_s=45", fault], run_dir, kill_in_phase
    )
    final = result.final
    assert killed, "SuperNode 2 never reached the masked-vector stage"
    assert final["rounds_run"] == 1
    assert (2, "local") in {(f["client"], f["phase"]) for f in final["failures"]}
    assert final["privacy"]["fedavg"]["rounds_answered_asked"] == [[4, 6]]
    assert math.isfinite(final["test"]["rmse"])
