"""The FedAvg phase through Flower's SecAgg+ (``privacy.secagg=true``, docs/privacy.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import FitIns, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from cnfgnn.experiment import run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation import secure
from cnfgnn.flower import secagg
from tests.helpers import DP, QUIET, REPLAY, TINY, make_cfg

SECAGG_DP = (*DP, "federation.nodes_per_client=1", *REPLAY)  # the same noise in both runs


class RecordingGrid:
    """Wraps the ServerApp's grid; keeps every reply the server receives."""

    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def pull_messages(self, ids):
        out = list(self.grid.pull_messages(ids))
        self.replies.extend(out)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        out = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(out)
        return out


def _theta(writer) -> dict[str, np.ndarray]:
    ckpt = torch.load(writer.dir / "checkpoint.pt", weights_only=False)
    return {k: np.asarray(v, np.float64) for k, v in ckpt["theta"].items()}


def test_fitins_round_trip_keeps_the_request():
    req = {
        P.ROUND: 3,
        P.STEP: 7,
        P.DP_NODES: 6,
        "w.a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "w.b": np.ones(4, np.float32),
    }
    ins = secagg.payload_to_fitins(req)
    back = secagg.fitins_to_payload(FitIns(ins.parameters, ins.config))
    assert set(back) == set(req)
    for k, v in req.items():
        if isinstance(v, np.ndarray):
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
        else:
            assert back[k] == v and type(back[k]) is type(v)


def test_contribution_is_the_sum_of_the_nodes_updates():
    theta = {"a": np.array([1.0, 2.0], np.float32)}
    w = np.array([[1.5, 2.0], [0.0, 3.0]], np.float32)  # two nodes
    parts = secure.client_contribution({"w.a": theta["a"]}, {"w.a": w})
    np.testing.assert_allclose(parts[0], [-0.5, 1.0])
    res = secure.SecureSum(mean={"a": parts[0] / 1}, clients=[0])
    np.testing.assert_allclose(secure.apply_secure_mean(theta, res, 2)["a"], w.mean(0))


def test_range_check_refuses_clipping_and_overflow():
    secure.check_secagg_range(1.0, 1.0, 1, 8, 8, 8.0, 2**22, 2**32)
    with pytest.raises(ValueError, match="clipping_range"):
        secure.check_secagg_range(1.0, 1.0, 4, 8, 2, 8.0, 2**22, 2**32)
    with pytest.raises(ValueError, match="overflow"):
        secure.check_secagg_range(1.0, 1.0, 1, 2000, 2000, 8.0, 2**22, 2**32)


def test_inprocess_engine_refuses_secagg(tmp_path):
    cfg = make_cfg(*TINY, *SECAGG_DP, f"output_root={tmp_path}", "privacy.secagg=true")
    with pytest.raises(
        ValueError, match=r"privacy.secagg=true needs an engine .* in-process engine .* refuses it"
    ):
        run_experiment(cfg, **QUIET)


def test_secagg_simulation_equals_node_noised_average_and_hides_updates(flower_env):
    """(a) SecAgg+ in simulation gives the node-noised FedAvg of the in-process run within
    the quantisation step; (b) no reply the server gets in the FedAvg phase holds one
    client's update: there is no train.local reply, and the masked vectors are not in
    the quantised range [0, Q] that an unmasked vector would occupy."""
    tmp = flower_env
    ref, ref_writer = run_experiment(make_cfg(*TINY, *SECAGG_DP, f"output_root={tmp}/a"), **QUIET)
    rec = {}

    def record(engine):
        rec["grid"] = engine.grid = RecordingGrid(engine.grid)
        return engine

    cfg = make_cfg(
        *TINY, *SECAGG_DP, f"output_root={tmp}/b", "engine=simulation", "privacy.secagg=true"
    )
    final, writer = run_experiment(cfg, engine_wrapper=record, **QUIET)
    sa = cfg.privacy.secagg_plus
    step = 2 * float(sa.clipping_range) / int(sa.quantization_range)
    got, want = _theta(writer), _theta(ref_writer)
    for name in want:
        diff = np.abs(got[name] - want[name]).max()
        assert diff <= step + 1e-6, (name, diff, step)
    assert final["privacy"]["fedavg"]["secagg"] is True
    assert final["failures"] == []
    replies = rec["grid"].replies
    types = {r.metadata.message_type for r in replies}
    assert P.LOCAL_TRAIN not in types and secagg.SECAGG_TYPE in types
    masked = 0
    for r in replies:
        if r.metadata.message_type != secagg.SECAGG_TYPE:
            continue
        assert all(len(a) == 0 for a in r.content.array_records.values())
        sec = r.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS not in sec:  # key stages: public keys, encrypted shares
            continue
        masked += 1
        assert set(r.content.config_records["fitres.metrics"]) == {P.STEP}  # nothing else
        vals = np.concatenate([bytes_to_ndarray(b).ravel() for b in sec[Key.MASKED_PARAMETERS]])
        above = np.mean(vals > int(sa.quantization_range))
        assert above > 0.9, above  # unmasked, every value would be in [0, Q]
    assert masked == final["nodes"]["clients"]
    assert final["wire_bytes"][secagg.SECAGG_TYPE]["up"] > 0


@pytest.mark.slow
def test_secagg_round_completes_when_a_client_drops_in_the_masked_stage(flower_env):
    """Client 1 fails in the masked-vector stage: SecAgg+ rebuilds its pairwise masks from
    its neighbours' shares, the round completes, and the accountant counts 5 of 6 nodes."""
    cfg = make_cfg(
        *TINY,
        *SECAGG_DP,
        f"output_root={flower_env}",
        "engine=simulation",
        "privacy.secagg=true",
        "++engine.fault={partition:1,message_type:train}",
    )
    final, writer = run_experiment(cfg, **QUIET)
    assert [(f["client"], f["phase"]) for f in final["failures"]] == [(1, "local")]
    assert final["privacy"]["fedavg"]["rounds_answered_asked"] == [[5, 6]]
    theta = _theta(writer)
    assert all(np.isfinite(v).all() for v in theta.values())
    assert np.isfinite(final["test"]["rmse"])
