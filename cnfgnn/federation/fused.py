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
from typing import Any

import numpy as np
import torch
from torch import nn

from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import LocalSeries, NodeWorker, SplitBatch, split_decode
from cnfgnn.federation.validate import check_request
from cnfgnn.models.node_seq2seq import NodeSeq2Seq
from cnfgnn.optim import make_adam

log = logging.getLogger(__name__)

#: Message types answered together.
FUSED_TYPES = frozenset({P.SPLIT_STEP, P.LOCAL_TRAIN})
#: Model hyper-parameters that must agree for two clients' models to stack.
ARCH = ("input_size", "output_size", "hidden_size", "num_layers", "graph_embedding", "horizon")


class FusedClients:
    """Answers the fusable messages of the clients one process hosts, several at a time.

    Args:
        workers: client id -> its worker (the engine's, shared: the replies and the state
            changes are those of :meth:`NodeWorker.handle`).
    """

    def __init__(self, workers: Mapping[int, NodeWorker]):
        self.workers = workers
        # the stacked model of the last group, with the parameters (and their in-place
        # version counters) it was copied from: reused while none of them changed
        self._stacked: tuple[list[torch.Tensor], list[int], NodeSeq2Seq] | None = None
        # the clients' series as one worker's, by group: (their inputs, the merged worker)
        self._merged: dict[tuple[int, ...], tuple[list[torch.Tensor], NodeWorker]] = {}

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
        size = workers[0].cfg.get("node_chunk")
        net = self._model(workers)
        grad, sums, counts = split_decode(net.node_groups(size, trainable=False), sb)
        replies: dict[int, P.Payload] = {}
        k0 = 0
        for cid, worker in zip(ids, workers):
            rows = slice(k0, k0 + worker.num_nodes)
            k0 = rows.stop
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
        net = merged.net
        with torch.no_grad():
            for name, p in net.named_parameters():
                torch.cat([w.net.get_parameter(name).detach() for w in workers], out=p.data)
        if merged.cfg.model.graph_embedding:
            merged.h_g_train = torch.cat([_h_g_train(w) for w in workers], dim=1)
        fed = merged.cfg.federation
        optimizer = make_adam(net.parameters(), lr=fed.lr, weight_decay=fed.weight_decay)
        loss_sum, count, step = merged.train_epochs(int(first[P.STEP]), optimizer, None, len(ids))
        merged.h_g_train = None
        replies: dict[int, P.Payload] = {}
        k0 = 0
        with torch.no_grad():
            for worker in workers:
                rows = slice(k0, k0 + worker.num_nodes)
                k0 = rows.stop
                for name, p in worker.net.named_parameters():
                    p.copy_(net.get_parameter(name)[rows])
        k0 = 0
        for cid, worker in zip(ids, workers):
            rows = slice(k0, k0 + worker.num_nodes)
            k0 = rows.stop
            worker.optimizer = None  # reset_client_optimizer: as local_train leaves it
            replies[cid] = worker.local_reply(
                payloads[cid], None, loss_sum[rows].clone(), count[rows].clone(), step
            )
        return replies

    def _merged_worker(self, ids: list[int], workers: list[NodeWorker]) -> NodeWorker:
        """One worker over the clients' series (inputs and masks stacked, a stacked model
        of theirs), rebuilt when a client's inputs were replaced (``configure``)."""
        key = tuple(ids)
        inputs = [w.scaled_inputs for w in workers]
        cached = self._merged.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], inputs)):
            return cached[1]
        first = workers[0]
        s = first.series
        series = LocalSeries(
            nodes=np.concatenate([w.series.nodes for w in workers]),
            sensor_ids=[i for w in workers for i in w.series.sensor_ids],
            speed=np.concatenate([w.series.speed for w in workers], axis=1),
            mask=np.concatenate([w.series.mask for w in workers], axis=1),
            time_of_day=s.time_of_day,
            starts=s.starts,
        )
        merged = NodeWorker(series, first.cfg, first.device, build_model=False)
        merged.model = stack_models([w.net for w in workers], trainable=True)
        merged.inputs = torch.cat(inputs)
        merged.observed = torch.cat([w.observed for w in workers])
        self._merged = {key: (inputs, merged)}  # one group per process at a time
        return merged

    def _model(self, workers: list[NodeWorker]) -> NodeSeq2Seq:
        """The workers' node models stacked into one (copies, no gradients), reused while
        no parameter was replaced or changed in place since it was built."""
        params: list[torch.Tensor] = [p for w in workers for p in w.net.parameters()]
        versions = [p._version for p in params]
        if self._stacked is not None:
            old, old_versions, net = self._stacked
            if len(old) == len(params) and old_versions == versions:
                if all(a is b for a, b in zip(old, params)):
                    return net
        net = stack_models([w.net for w in workers])
        self._stacked = (params, versions, net)
        return net


def stack_models(nets: list[NodeSeq2Seq], trainable: bool = False) -> NodeSeq2Seq:
    """One :class:`NodeSeq2Seq` whose nodes are those of ``nets``, in order (copied)."""
    first = nets[0]
    with torch.device("meta"):  # no storage, no draw from the global generator
        out = NodeSeq2Seq(sum(n.num_nodes for n in nets), *(getattr(first, a) for a in ARCH))
    for name, _ in first.named_parameters():
        owner, _, attr = name.rpartition(".")
        rows = torch.cat([n.get_parameter(name).detach() for n in nets])
        setattr(out.get_submodule(owner), attr, nn.Parameter(rows, requires_grad=trainable))
    return out


def _h_g_train(worker: NodeWorker) -> torch.Tensor:
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
    net = worker.net
    batch = np.asarray(payload.get(P.BATCH, worker.series.starts[P.TRAIN]))
    return (
        str(worker.device),
        tuple(getattr(net, a) for a in ARCH),
        id(worker.cfg),
        batch.tobytes(),
        int(payload[P.STEP]),
        int(payload[P.ROUND]),
    )
