"""Co-located clients in one stacked pass (engine.fuse_clients): each client gets the reply
(and, after local training, the model) it would have computed alone; malformed requests,
privacy and changed weights are handled as one by one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cnfgnn.experiment import run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation.engines import InProcessEngine
from cnfgnn.federation.fused import FusedClients
from cnfgnn.models.node_seq2seq import teacher_forcing_prob
from tests.helpers import DP, REPLAY, TINY, in_process_federation, make_cfg

PER_SENSOR = (*TINY, "federation.nodes_per_client=1")  # 6 clients of one sensor


def _trained(*overrides: str):
    """Workers of 6 one-sensor clients after one round (encoded, with h_G)."""
    cfg = make_cfg(*PER_SENSOR, *overrides)
    _, workers, orch = in_process_federation(cfg)
    orch.train_round()
    return cfg, workers


def _requests(cfg, workers, seed: int = 0) -> dict[int, P.Payload]:
    """One server batch's split-step requests: the same windows, step and round for every
    client, each with its own random h_G. The round is not the workers' (their coins must
    follow the request), and the step is where scheduled sampling feeds the truth about
    half the time (so the coins matter)."""
    gen = np.random.default_rng(seed)
    m = cfg.model
    k = float(m.cl_decay_steps)
    step = int(k * math.log(k))  # k / (k + e^(s/k)) = 1/2
    assert 0.3 < teacher_forcing_prob(step, k) < 0.7
    assert all(w.round != 5 for w in workers.values())
    batch = np.array([5, 0, 17, 3, 9], np.int64)
    return {
        cid: {
            P.BATCH: batch,
            P.H_G: gen.standard_normal(
                (len(batch), w.num_nodes, m.num_layers, m.hidden_size)
            ).astype(np.float32),
            P.ROUND: 5,
            P.STEP: step,
        }
        for cid, w in workers.items()
    }


def _assert_same(got: P.Payload, want: P.Payload) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-8, err_msg=key)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_replies_equal_each_clients_own(masked):
    masking = f"federation.loss_masked={str(masked).lower()}"
    cfg, workers = _trained(masking)
    _, alone_workers = _trained(masking)  # the same run again, answering one by one
    requests = _requests(cfg, workers)
    together = FusedClients(workers).answer(P.SPLIT_STEP, requests)
    alone = {c: alone_workers[c].handle(P.SPLIT_STEP, r) for c, r in requests.items()}
    assert sorted(together) == sorted(workers)  # all six in one pass
    assert all(w.round == 5 for w in workers.values())
    for cid in workers:
        _assert_same(together[cid], alone[cid])
        assert together[cid][P.GRAD].shape == alone[cid][P.GRAD].shape
    assert np.abs(together[0][P.GRAD] - together[1][P.GRAD]).max() > 0  # not one client's


def _local_requests(workers) -> dict[int, P.Payload]:
    """Round 2's local-training requests: one global model (a perturbed copy of client 0's,
    so that training starts somewhere new), the same step and round for every client."""
    gen = np.random.default_rng(1)
    glob = {
        f"{P.WEIGHTS_PREFIX}{k}": (v[0].numpy() + 0.01 * gen.standard_normal(v.shape[1:])).astype(
            np.float32
        )
        for k, v in workers[0].net.stacked_state().items()
    }
    return {cid: {P.STEP: 11, P.ROUND: 2, **glob} for cid in workers}


@pytest.mark.parametrize("masked", [False, True])
def test_fused_local_training_equals_each_clients_own(masked):
    masking = f"federation.loss_masked={str(masked).lower()}"
    _, workers = _trained(masking)
    _, alone_workers = _trained(masking)  # the same run again
    requests = _local_requests(workers)
    alone = {c: alone_workers[c].handle(P.LOCAL_TRAIN, r) for c, r in requests.items()}
    together = FusedClients(workers).answer(P.LOCAL_TRAIN, requests)
    assert sorted(together) == sorted(workers)
    for cid in workers:
        _assert_same(together[cid], alone[cid])
        for (name, p), q in zip(
            workers[cid].net.named_parameters(), alone_workers[cid].net.parameters(), strict=True
        ):
            np.testing.assert_allclose(p.detach(), q.detach(), rtol=1e-5, atol=1e-7, err_msg=name)
        assert workers[cid].optimizer is None and workers[cid].round == 2
    w = f"{P.WEIGHTS_PREFIX}readout.weight"
    assert np.abs(together[0][w] - together[1][w]).max() > 0  # each trained its own node


def test_changed_weights_are_seen_and_other_types_are_not_fused():
    cfg, workers = _trained()
    fused = FusedClients(workers)
    requests = _requests(cfg, workers)
    fused.answer(P.SPLIT_STEP, requests)  # builds the stacked model
    with torch.no_grad():  # as Adam or a global-model load would: in place
        next(workers[3].net.parameters()).mul_(1.5)
    again = fused.answer(P.SPLIT_STEP, requests)
    _assert_same(again[3], workers[3].handle(P.SPLIT_STEP, requests[3]))
    assert fused.answer(P.EMBED, {c: {} for c in workers}) == {}
    assert fused.answer(P.SPLIT_STEP, {0: requests[0]}) == {}  # one client: nothing to stack


def test_malformed_and_mismatched_requests_are_answered_alone():
    cfg, workers = _trained()
    requests = _requests(cfg, workers)
    requests[2][P.H_G] = requests[2][P.H_G].copy()
    requests[2][P.H_G][0, 0, 0, 0] = np.nan  # refused by the check
    requests[4] = dict(requests[4], **{P.STEP: 8})  # another step: not in the same pass
    fused = FusedClients(workers).answer(P.SPLIT_STEP, requests)
    assert sorted(fused) == [0, 1, 3, 5]
    replies = InProcessEngine(workers, fuse=True).send(P.SPLIT_STEP, requests)
    assert isinstance(replies[2], P.ClientFailure) and "finite" in replies[2].reason
    _assert_same(replies[4], workers[4].handle(P.SPLIT_STEP, requests[4]))
    for cid in (0, 1, 3, 5):
        _assert_same(replies[cid], fused[cid])


def test_wrapped_or_patched_workers_answer_through_their_own_handlers():
    """A fused pass would bypass what wraps or patches a worker (a test double, a hostile
    client): such workers are answered one by one, through their own methods."""
    cfg, workers = _trained()

    class Wrapped:  # proxies everything, changes nothing
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def handle(self, mtype, payload):
            self.calls += 1
            return self.inner.handle(mtype, payload)

    def offline(payload):
        raise RuntimeError("sensor offline")

    workers[1] = Wrapped(workers[1])
    workers[3].split_step = offline
    requests = _requests(cfg, workers)
    assert sorted(FusedClients(workers).answer(P.SPLIT_STEP, requests)) == [0, 2, 4, 5]
    replies = InProcessEngine(workers, fuse=True).send(P.SPLIT_STEP, requests)
    assert workers[1].calls == 1 and not isinstance(replies[1], P.ClientFailure)
    assert isinstance(replies[3], P.ClientFailure) and "sensor offline" in replies[3].reason


def test_clients_under_privacy_are_not_fused():
    """Release noise is drawn per client: those steps stay one pass per client."""
    cfg, workers = _trained(*DP, *REPLAY)
    requests = _requests(cfg, workers)
    assert FusedClients(workers).answer(P.SPLIT_STEP, requests) == {}
    assert FusedClients(workers).answer(P.LOCAL_TRAIN, _local_requests(workers)) == {}
    replies = InProcessEngine(workers, fuse=True).send(P.SPLIT_STEP, requests)
    assert not any(isinstance(r, P.ClientFailure) for r in replies.values())


def test_a_whole_run_is_the_same_with_and_without_fusion(tmp_path, monkeypatch):
    fused: list[tuple[str, int]] = []
    answer = FusedClients.answer

    def counting(self, mtype, payloads):
        out = answer(self, mtype, payloads)
        fused.append((mtype, len(out)))
        return out

    monkeypatch.setattr(FusedClients, "answer", counting)
    runs = []
    for fuse in ("true", "false"):
        cfg = make_cfg(
            *PER_SENSOR,
            f"output_root={tmp_path}/{fuse}",
            "engine.processes=1",
            f"engine.fuse_clients={fuse}",
        )
        final, writer = run_experiment(cfg, progress=lambda s: None)
        runs.append((final, writer.rounds()))
        if fuse == "true":  # every split step and local phase went in one pass of 6
            assert {(t, n) for t, n in fused if n} == {(P.SPLIT_STEP, 6), (P.LOCAL_TRAIN, 6)}
            fused.clear()
    assert not fused  # engine.fuse_clients=false: never asked
    (a, rounds_a), (b, rounds_b) = runs
    for ra, rb in zip(rounds_a, rounds_b, strict=True):
        for key in ("train_loss", "split_loss", "val_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    assert a["test"]["rmse"] == pytest.approx(b["test"]["rmse"], rel=1e-5)
