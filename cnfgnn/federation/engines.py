"""Engines: how the server orchestration reaches the clients.

The orchestration (:mod:`cnfgnn.federation.rounds`) talks to an engine with one verb,
``send(message_type, {client: payload}) -> {client: reply | ClientFailure}``. The
in-process engine calls each client's handler directly (also the test harness); with several
clients on a multi-core CPU, :func:`local_engine` runs them in forked processes side by side
(:mod:`cnfgnn.federation.processes`). The Flower engines route the same payloads through a
``Grid``.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Protocol

import torch

from cnfgnn import progress
from cnfgnn.federation import protocol as P
from cnfgnn.federation.fused import FusedClients
from cnfgnn.federation.node import NodeWorker
from cnfgnn.federation.processes import ProcessEngine, client_processes

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the orchestration needs from a transport."""

    def client_ids(self) -> list[int]:
        """Ids of the clients currently reachable."""
        ...

    def send(
        self, message_type: str, payloads: dict[int, P.Payload]
    ) -> dict[int, P.Payload | P.ClientFailure]:
        """Deliver one message to each addressed client and collect the replies."""
        ...


class InProcessEngine:
    """Calls :meth:`NodeWorker.handle` directly; a raising client becomes a failure.

    Args:
        workers: client id -> the worker holding that client's series and state.
        fuse: answer the split step and local training of several clients in one pass
            (:mod:`cnfgnn.federation.fused`, ``engine.fuse_clients``); the same replies.
    """

    def __init__(self, workers: dict[int, NodeWorker], fuse: bool = False):
        self.workers = workers
        self.fused = FusedClients(workers) if fuse else None

    def client_ids(self) -> list[int]:
        return sorted(self.workers)

    def send(
        self, message_type: str, payloads: dict[int, P.Payload]
    ) -> dict[int, P.Payload | P.ClientFailure]:
        replies: dict[int, P.Payload | P.ClientFailure] = {}
        if self.fused is not None:
            replies.update(self.fused.answer(message_type, payloads))
            progress.answered(len(replies), len(payloads))
        for cid, payload in payloads.items():
            if cid in replies:
                continue
            try:
                replies[cid] = self.workers[cid].handle(message_type, payload)
            except Exception as exc:  # a broken client costs its answer, not the run
                log.warning("client %s failed on %s: %s", cid, message_type, exc)
                log.debug("%s", traceback.format_exc())
                replies[cid] = P.ClientFailure(f"{type(exc).__name__}: {exc}")
            progress.answered(len(replies), len(payloads))
        return replies

    #: The clients run in this process (the same attribute as :class:`ProcessEngine`'s).
    processes = 1

    def close(self) -> None:
        """Nothing to stop (the same verb as :class:`ProcessEngine`)."""


def local_engine(
    cfg: Any, workers: dict[int, NodeWorker], device: torch.device
) -> InProcessEngine | ProcessEngine:
    """The engine ``engine=inprocess`` runs on: the clients one after another in this
    process, or, when ``engine.processes`` (:func:`client_processes`) gives more than one,
    in that many forked processes with ``threads // processes`` torch threads each; with
    ``engine.fuse_clients`` (default on) a process answers its clients' split steps and local
    training in stacked passes. Call ``close()`` when the run ends (also on failure)."""
    threads = torch.get_num_threads()
    # a run directory from before engine.processes existed (resume=true) lacks the key
    n = client_processes(cfg.engine.get("processes", "auto"), len(workers), threads, device)
    fuse = bool(cfg.engine.get("fuse_clients", True))
    if n <= 1:
        return InProcessEngine(workers, fuse)
    return ProcessEngine(workers, n, max(1, threads // n), fuse)
