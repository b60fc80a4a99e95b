"""Engines: how the server orchestration reaches the clients.

The orchestration (:mod:`cnfgnn.federation.rounds`) talks to an engine with one verb,
``send(message_type, {client: payload}) -> {client: reply | ClientFailure}``. The
in-process engine calls each client's handler directly (fastest; also the test harness);
the Flower engines route the same payloads through a ``Grid``.
"""

from __future__ import annotations

import logging
import traceback
from typing import Protocol

from cnfgnn import progress
from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import NodeWorker

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
    """

    def __init__(self, workers: dict[int, NodeWorker]):
        self.workers = workers

    def client_ids(self) -> list[int]:
        return sorted(self.workers)

    def send(
        self, message_type: str, payloads: dict[int, P.Payload]
    ) -> dict[int, P.Payload | P.ClientFailure]:
        replies: dict[int, P.Payload | P.ClientFailure] = {}
        for cid, payload in payloads.items():
            try:
                replies[cid] = self.workers[cid].handle(message_type, payload)
            except Exception as exc:  # a broken client costs its answer, not the run
                log.warning("client %s failed on %s: %s", cid, message_type, exc)
                log.debug("%s", traceback.format_exc())
                replies[cid] = P.ClientFailure(f"{type(exc).__name__}: {exc}")
            progress.answered(len(replies), len(payloads))
        return replies
