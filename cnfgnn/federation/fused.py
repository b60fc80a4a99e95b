"""Co-located clients answered in one batched pass (``engine.fuse_clients``).

A client of K sensors already runs its nodes as one stacked model whose nodes never interact
(:meth:`NodeSeq2Seq.node_groups`), and every per-node draw (window order, scheduled-sampling
coins) is keyed by the node, not the client. So when one process hosts many clients, as the
in-process engines do at one client per sensor, their messages of one kind can be answered as
if the clients were one client of all their sensors:

* the split step (a server batch: the same windows, step and round for every client): each
  client's model rows, ``h_c``, ``h_G``, series, coins and loss masks stacked; one decode per
  ``node_chunk`` run; each client's rows of ``dL/dh_G`` and losses in its own reply;
* local training (the same round and step, a fresh Adam per round as CNFGNN's
  ``reset_client_optimizer``): each client loads its global model as alone, the stacked
  models train on the stacked series (Adam is element-wise), and each client gets its own
  rows of the weights back before it answers.

Nothing of one client reaches another client's reply or model, and the replies equal the
clients' own answers to float rounding (tested). Each request is checked against its own
client first (:func:`check_request`), as :meth:`NodeWorker.handle` does. A client that fails
the check, a client under ``privacy`` (its noise is per client), FMTL's coupled training, a
worker that is not a plain :class:`NodeWorker` with the class's own handlers (a wrapper or a
patched method would be bypassed) and any other message type are left to the engine, which
answers them one by one; so is every client of a pass that raises.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import LocalSeries, NodeWorker, SplitBatch, split_decode
from cnfgnn.federation.validate import check_request
from cnfgnn.models.node_seq2seq import NodeSeq2Seq
from cnfgnn.optim import make_adam

log = logging.getLogger(__name__)

#: Message types answered together.
FUSED_TYPES = frozenset({P.SPLIT_STEP, P.LOCAL_TRAIN})


class FusedClients:
    """Answers the fusable messages of the clients one process hosts, several at a time.

    Args:
        workers: client id -> its worker (the engine's, shared: the replies and the state
            changes are those of :meth:`NodeWorker.handle`).
    """

    def __init__(self, workers: Mapping[int, NodeWorker]):
        self.workers = workers
        self._merged: _Merged | None = None  # the last group's clients as one worker

    def answer(self, message_type: str, payloads: Mapping[int, P.Payload]) -> dict[int, P.Payload]:
        """Replies of the clients answered together; the rest are the caller's to answer."""
        if message_type not in FUSED_TYPES or len(payloads) < 2:
            return {}
        groups: dict[tuple[Any, ...], dict[int, P.Payload]] = {}
        for cid, payload in payloads.items():
            worker = self.workers.get(cid)
            if worker is None or not _fusable(worker, message_type):
                continue
            try:
                checked = check_request(message_type, payload, worker.limits())
            except Exception:  # answered on its own, where the check raises again
                continue
            if message_type == P.LOCAL_TRAIN and any(k.startswith(P.NBR_PREFIX) for k in checked):
                continue  # FMTL couples a client's nodes to its neighbours' weights
            groups.setdefault(_same_pass(worker, checked), {})[cid] = checked
        run = self._split_step if message_type == P.SPLIT_STEP else self._local_train
        replies: dict[int, P.Payload] = {}
        for group in groups.values():
            if len(group) < 2:
                continue
            try:
                replies.update(run(group))
            except Exception as exc:  # each client then answers (or fails) on its own
                log.debug("fused %s of %d clients failed: %r", message_type, len(group), exc)
        return replies

    def _split_step(self, payloads: dict[int, P.Payload]) -> dict[int, P.Payload]:
        """:meth:`NodeWorker.split_step` of several clients in one pass."""
        ids = list(payloads)
        workers = [self.workers[cid] for cid in ids]
        first = payloads[ids[0]]
        step, round_ = int(first[P.STEP]), int(first[P.ROUND])
        for worker in workers:  # before the coins, which are keyed by the round
            worker.round = round_
        sb = SplitBatch.stack([w.split_batch(payloads[c]) for c, w in zip(ids, workers)])
        merged = self._merged_worker(ids, workers)
        merged.net.train()
        grad, sums, counts = split_decode(merged._groups(trainable=False), sb)
        replies: dict[int, P.Payload] = {}
        for cid, worker, rows in zip(ids, workers, _rows(workers)):
            replies[cid] = worker.split_reply(
                grad[:, rows].clone(), sums[rows].clone(), counts[rows].clone(), step
            )
        return replies

    def _local_train(self, payloads: dict[int, P.Payload]) -> dict[int, P.Payload]:
        """:meth:`NodeWorker.local_train` of several clients in one pass."""
        ids = list(payloads)
        workers = [self.workers[cid] for cid in ids]
        first = payloads[ids[0]]
        for cid, worker in zip(ids, workers):  # as each would alone
            worker.round = int(payloads[cid][P.ROUND])
            worker._load_global(payloads[cid])
        merged = self._merged_worker(ids, workers)
        merged.round = int(first[P.ROUND])
        if merged.cfg.model.graph_embedding:
            merged.h_g_train = torch.cat([_h_g_train(w) for w in workers], dim=1)
        fed = merged.cfg.federation
        optimizer = make_adam(merged.net.parameters(), lr=fed.lr, weight_decay=fed.weight_decay)
        loss_sum, count, step = merged.train_epochs(int(first[P.STEP]), optimizer, None, len(ids))
        merged.h_g_train = None
        replies: dict[int, P.Payload] = {}
        for cid, worker, rows in zip(ids, workers, _rows(workers)):
            with torch.no_grad():  # the client's own rows of the trained weights
                for name, p in worker.net.named_parameters():
                    p.copy_(merged.net.get_parameter(name)[rows])
            worker.optimizer = None  # reset_client_optimizer: as local_train leaves it
            replies[cid] = worker.local_reply(
                payloads[cid], None, loss_sum[rows].clone(), count[rows].clone(), step
            )
        return replies

    def _merged_worker(self, ids: list[int], workers: list[NodeWorker]) -> NodeWorker:
        """The clients as one worker whose model holds their current weights: rebuilt for
        another group or after a client's inputs were replaced (``configure``); its weights
        copied again when a client's parameter was replaced or changed in place."""
        inputs = [w.scaled_inputs for w in workers]
        params: list[Tensor] = [p for w in workers for p in w.net.parameters()]
        versions = [p._version for p in params]
        last = self._merged
        if last is None or last.ids != tuple(ids) or not _same(last.inputs, inputs):
            merged = _merge(workers)
        else:
            merged = last.worker
            if not _same(last.params, params) or last.versions != versions:
                with torch.no_grad():
                    for name, p in merged.net.named_parameters():
                        torch.cat([w.net.get_parameter(name) for w in workers], out=p.data)
        self._merged = _Merged(tuple(ids), inputs, params, versions, merged)
        return merged


@dataclass
class _Merged:
    """A group of clients as one worker, and what it was made from: the clients' inputs and
    parameters (the same objects) and the parameters' in-place version counters."""

    ids: tuple[int, ...]
    inputs: list[Tensor]
    params: list[Tensor]
    versions: list[int]
    worker: NodeWorker


def _merge(workers: list[NodeWorker]) -> NodeWorker:
    """One worker over the clients' series: nodes, inputs and masks stacked, and a stacked
    copy of their models (trainable: local training steps it)."""
    s = workers[0].series
    series = LocalSeries(
        nodes=np.concatenate([w.series.nodes for w in workers]),
        sensor_ids=[i for w in workers for i in w.series.sensor_ids],
        speed=np.concatenate([w.series.speed for w in workers], axis=1),
        mask=np.concatenate([w.series.mask for w in workers], axis=1),
        time_of_day=s.time_of_day,
        starts=s.starts,
    )
    merged = NodeWorker(series, workers[0].cfg, workers[0].device, build_model=False)
    merged.model = NodeSeq2Seq.stacked([w.net for w in workers], trainable=True)
    merged.inputs = torch.cat([w.scaled_inputs for w in workers])
    merged.observed = torch.cat([w.observed for w in workers])
    return merged


def _rows(workers: list[NodeWorker]) -> list[slice]:
    """Each worker's rows in the stacked node axis."""
    ends = np.cumsum([0] + [w.num_nodes for w in workers])
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    """The same tensor objects, in order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _h_g_train(worker: NodeWorker) -> Tensor:
    if worker.h_g_train is None:
        raise RuntimeError(f"{P.LOCAL_TRAIN} before {P.EMBED}: no h_G for the windows")
    return worker.h_g_train


def _fusable(worker: Any, message_type: str) -> bool:
    """Whether a worker's message may run stacked with others': a plain
    :class:`NodeWorker` whose handler is the class's own (a wrapped or patched worker answers
    through its own ``handle``), with a node model, no noise (it is drawn per client),
    configured; encoded for the split step; a fresh Adam each round for local training (a
    kept one would be the client's own state)."""
    if type(worker) is not NodeWorker:
        return False
    row = P.message(message_type)
    if row is None or {"handle", row.method} & set(vars(worker)):
        return False
    if worker.model is None or worker.privacy is not None or worker.inputs is None:
        return False
    if message_type == P.SPLIT_STEP:
        return P.TRAIN in worker.h_c
    return bool(worker.cfg.federation.reset_client_optimizer)


def _same_pass(worker: NodeWorker, payload: P.Payload) -> tuple[Any, ...]:
    """What clients must share to run in one pass: device, model shape, config (local
    training runs on one), windows (the split step's batch; local training: the training
    windows' starts), step and round. Each client's draws are its nodes' own."""
    batch = np.asarray(payload.get(P.BATCH, worker.series.starts[P.TRAIN]))
    return (
        str(worker.device),
        worker.net.architecture,
        id(worker.cfg),
        batch.tobytes(),
        int(payload[P.STEP]),
        int(payload[P.ROUND]),
    )
