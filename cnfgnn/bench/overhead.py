"""Per-message overhead of an in-process client: what a message costs beyond its handler.

``cnfgnn-bench`` (engines mode) runs :func:`measure_message_overhead` before the cases, in a
subprocess with the cases' thread setting. It builds one client per sensor for the first
``clients`` sensors of the bench's dataset, runs the real handshake through an
:class:`~cnfgnn.federation.rounds.Orchestrator` over the
:class:`~cnfgnn.federation.engines.InProcessEngine`, and then, for each round message type
(a split step with a tiny batch, embed, encode and evaluate of the validation split),
repeats the orchestrator's own path: build the payloads (slicing ``h_G`` per client),
``Orchestrator._send`` (request validation and ``NodeWorker.limits`` on the node, dispatch,
the engine's failure wrapper, reply validation, byte counting, quorum) and the reply's
assembly into ``[S, N, ...]``. The handler methods are timed inside that same send (a clock
around each worker's method, which ``NodeWorker.handle`` calls), so the difference is exact
rather than the difference of two noisy runs.

The overhead of one message is (the path's seconds - the handlers' seconds) / clients, plus
the handler's random-number set-up (the scheduled-sampling coins of a split step, drawn
inside the handler but not model compute). Reported per message type: median and 90th
percentile over the repetitions, the handler's own seconds, and the parts on their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnfgnn.data.dataset import SensorData
from cnfgnn.federation import protocol as P


@dataclass
class _Message:
    """One measured message type: how the orchestrator builds and unpacks it.

    Attributes:
        label: JSON key.
        mtype: protocol message type.
        phase: the orchestrator phase it is sent in.
        build: ``() -> {client: payload}`` (the orchestrator's packing, timed).
        unpack: ``(replies) -> None`` (the orchestrator's assembly, timed).
        rng: ``(worker) -> None``: the handler's random-number set-up, or None.
    """

    label: str
    mtype: str
    phase: str
    build: Callable[[], dict[int, P.Payload]]
    unpack: Callable[[dict[int, P.Payload]], Any]
    rng: Callable[[Any], Any] | None = None


#: Parts of a message's overhead reported on their own (seconds per message, medians).
_PARTS = ("pack_unpack", "send_minus_handler", "rng", "check_request", "check_reply")


class _HandlerClock:
    """Adds up the seconds spent inside wrapped handler methods."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[[P.Payload], P.Payload]) -> Callable[[P.Payload], P.Payload]:
        def clocked(payload: P.Payload) -> P.Payload:
            t0 = time.perf_counter()
            try:
                return fn(payload)
            finally:
                self.seconds += time.perf_counter() - t0

        return clocked


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def measure_message_overhead(
    cfg: Any, data: SensorData, device: Any, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Seconds per message outside the handler's compute, per message type.

    Args:
        cfg: the experiment config of the per-sensor case (``model``, ``federation``,
            ``dataset``, ``seed``); threads already applied.
        data: the bench's dataset (its first ``settings['clients']`` sensors are used).
        device: torch device of the workers and the GN.
        settings: ``bench.message_overhead``: ``clients``, ``repeats``, ``warmup``,
            ``split_batch`` (windows in the split step), ``goal_s``.

    Returns:
        ``what``, ``clients``, ``repeats``, ``split_batch``, ``goal_s``, ``seconds``,
        ``empty_send_s`` (median seconds of a send to no client: the per-send part, which
        ``overhead_s`` spreads over ``clients`` messages) and ``types``: label ->
        ``message_type``, ``overhead_s`` (median, p90 per message), ``handler_s`` (median
        per message), ``parts_s`` (medians per message: ``pack_unpack``,
        ``send_minus_handler``, ``rng``, and, timed on their own, ``check_request`` and
        ``check_reply``) and ``met`` (median below ``goal_s``).
    """
    from cnfgnn.federation.engines import InProcessEngine
    from cnfgnn.federation.node import LocalSeries, NodeWorker
    from cnfgnn.federation.rounds import Orchestrator, ServerGraph
    from cnfgnn.federation.validate import check_reply, check_request

    t_start = time.perf_counter()
    n = min(int(settings["clients"]), data.num_nodes)
    tod = data.time_of_day()
    workers = {
        c: NodeWorker(LocalSeries.from_data(data, np.array([c]), cfg.dataset, tod), cfg, device)
        for c in range(n)
    }
    orch = Orchestrator(
        cfg, InProcessEngine(workers), ServerGraph.from_data(data), None, lambda s: None, device
    )
    orch.setup()  # the real handshake: hello, stats, configure (one client per sensor)
    orch.round, fed = 1, cfg.federation
    clients = sorted(workers)
    eval_bs = int(fed.server_eval_batch_size)
    h_c = orch._assemble(
        orch._send("encode", P.ENCODE, {c: {P.SPLIT: P.TRAIN} for c in clients}), P.H_C, orch.col
    )  # [S, n, L, H]
    h_c_val = orch._assemble(
        orch._send("val", P.ENCODE, {c: {P.SPLIT: P.VAL} for c in clients}), P.H_C, orch.eval_col
    )
    batch = np.arange(min(int(settings["split_batch"]), len(h_c)), dtype=np.int64)
    h_g = orch.server.forward(h_c[batch], orch.train_graph).detach().cpu().numpy()
    h_g_all = orch.server.embed_all(h_c, orch.train_graph, eval_bs)
    h_g_val = orch.server.embed_all(h_c_val, orch.eval_graph, eval_bs)

    def err_sums(replies: dict[int, P.Payload]) -> None:  # as Orchestrator.evaluate places them
        sums: dict[str, np.ndarray] = {}
        for c, r in replies.items():
            cols = [orch.eval_col[int(g)] for g in orch.client_nodes[c]]
            for k, v in r.items():
                if k.startswith(P.ERR_PREFIX):
                    sums.setdefault(k, np.zeros((n,) + v.shape[1:]))[cols] = v

    messages = [
        _Message(
            "split_step",
            P.SPLIT_STEP,
            "split",
            lambda: {
                c: {
                    P.BATCH: batch,
                    P.ROUND: orch.round,
                    P.STEP: 0,
                    P.H_G: orch._slice(h_g, c, orch.col),
                }
                for c in clients
            },
            lambda r: orch._assemble(r, P.GRAD, orch.col),
            lambda w: w._teacher("split", 0, 0),
        ),
        _Message(
            "embed",
            P.EMBED,
            "embed",
            lambda: {c: {P.H_G: orch._slice(h_g_all, c, orch.col)} for c in clients},
            lambda r: None,
        ),
        _Message(
            "encode_val",
            P.ENCODE,
            "val",
            lambda: {c: {P.SPLIT: P.VAL} for c in clients},
            lambda r: orch._assemble(r, P.H_C, orch.eval_col),
        ),
        _Message(
            "evaluate_val",
            P.EVALUATE,
            "val",
            lambda: {
                c: {P.SPLIT: P.VAL, P.H_G: orch._slice(h_g_val, c, orch.eval_col)} for c in clients
            },
            err_sums,
        ),
    ]
    reply_limits = orch._reply_limits()
    warmup, repeats = int(settings["warmup"]), int(settings["repeats"])
    goal = float(settings["goal_s"])
    clock = _HandlerClock()
    methods = {m.method for m in map(P.message, [x.mtype for x in messages]) if m is not None}
    for w in workers.values():  # NodeWorker.handle finds the clocked method on the instance
        for name in methods:
            setattr(w, name, clock.wrap(getattr(w, name)))

    def standalone(
        msg: _Message, payloads: dict[int, P.Payload], replies: dict[int, P.Payload]
    ) -> dict[str, float]:
        """Seconds of the random-number set-up and of both validations, each on its own."""
        t0 = time.perf_counter()
        if msg.rng is not None:
            for c in clients:
                msg.rng(workers[c])
        t1 = time.perf_counter()
        for c in clients:
            check_request(msg.mtype, payloads[c], workers[c].limits())
        t2 = time.perf_counter()
        for c in clients:
            check_reply(msg.mtype, payloads[c], replies[c], 1, reply_limits)
        t3 = time.perf_counter()
        return {"rng": t1 - t0, "check_request": t2 - t1, "check_reply": t3 - t2}

    out: dict[str, Any] = {}
    try:
        for msg in messages:
            rec: dict[str, list[float]] = {k: [] for k in _PARTS + ("overhead", "handler")}
            for i in range(warmup + repeats):
                clock.seconds = 0.0
                t0 = time.perf_counter()
                payloads = msg.build()
                t1 = time.perf_counter()
                replies = orch._send(msg.phase, msg.mtype, payloads)
                t2 = time.perf_counter()
                msg.unpack(replies)
                t3 = time.perf_counter()
                handler_s = clock.seconds
                parts = {
                    "pack_unpack": (t1 - t0) + (t3 - t2),
                    "send_minus_handler": (t2 - t1) - handler_s,
                }
                parts |= standalone(msg, payloads, replies)
                if i < warmup:
                    continue
                parts["overhead"] = (
                    parts["pack_unpack"] + parts["send_minus_handler"] + parts["rng"]
                )
                parts["handler"] = handler_s
                for key, value in parts.items():
                    rec[key].append(value / n)
            overhead = _stats(rec["overhead"])
            out[msg.label] = {
                "message_type": msg.mtype,
                "overhead_s": overhead,
                "handler_s": {"median": float(np.median(rec["handler"]))},
                "parts_s": {k: float(np.median(rec[k])) for k in _PARTS},
                "met": overhead["median"] < goal,
            }
    finally:
        for w in workers.values():
            for name in methods:
                delattr(w, name)
    empty = []  # what a send costs with no client at all (reply limits, progress, exchange)
    for _ in range(warmup + repeats):
        t0 = time.perf_counter()
        orch._send("split", P.SPLIT_STEP, {})
        empty.append(time.perf_counter() - t0)
    return {
        "what": (
            "seconds per message of the in-process engine with one client per sensor spent "
            "outside the handler's compute: (orchestrator packing + Orchestrator._send + "
            "unpacking - the handler methods timed inside that send) / clients, plus the "
            "handler's random-number set-up; parts_s are medians, check_* timed on their own"
        ),
        "clients": n,
        "repeats": repeats,
        "split_batch": len(batch),
        "goal_s": goal,
        "empty_send_s": float(np.median(empty[warmup:])),
        "types": out,
        "seconds": time.perf_counter() - t_start,
    }
