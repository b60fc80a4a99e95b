"""An indexed message lookup for Flower's in-memory LinkState in a simulation, and a
dispatch thread that a stored message wakes.

Flower 1.42's simulation runtime hands messages to its ClientApp actors from a thread that,
every 0.1 s, asks the in-memory LinkState for the next message of *each* SuperNode. The
state answers by checking every stored message (expiry, federation membership) before it
looks at the destination, so one pass costs nodes x stored messages checks under the state's
lock: at one client per sensor (207 SuperNodes, 207 messages in flight) about 43,000 checks
per pass, and a million at 1,000 sensors. Measured on the bench's ``flower_1`` case
(docs/results/2026-12-04-flower-dispatch.md) that scan took 34 s of an 86-s run and held
the lock that replies and pulls wait for.

:func:`fast_message_lookup` keeps, for the duration of a simulation that cnfgnn starts
(:func:`cnfgnn.flower.simulation.simulate`; ``flwr run .`` runs Flower's own runtime
process, which keeps Flower's lookup), an index of the messages stored for each node
(``store_message_ins`` adds to it) and answers
``get_message_ins`` from that node's entries alone. The messages returned, their order, the
``limit``, the expiry check and the delivery stamp are Flower's
(``tests/flower/test_linkstate.py`` compares both on the same state); an expired message of
another node is deleted when that node asks, in the same pass, instead of by the first node
to ask. Its dispatch thread (:func:`add_messages_to_queue`) makes Flower's passes, but a
stored message ends its 0.1-s wait: a round trip no longer starts up to a tick late
(``python -m cnfgnn.flower.dispatch``). The replacement is made only for the Flower release
it was written against (:data:`FLOWER_VERSION`); any other release keeps its own methods.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

FLOWER_VERSION = "1.42.0"
INDEX = "_cnfgnn_ins_by_node"  # state attribute: node id -> {message id: None}, stored order
WAKE = "_cnfgnn_stored"  # state attribute: threading.Event, set when a message is stored
TICK_S = 0.1  # Flower's dispatch interval: the longest the dispatch thread sleeps


def _index(state: Any) -> dict[int, dict[str, None]]:
    return state.__dict__.setdefault(INDEX, {})


def _wake(state: Any) -> threading.Event:
    return state.__dict__.setdefault(WAKE, threading.Event())


def store_message_ins(self: Any, message: Any) -> str | None:
    """Flower's ``store_message_ins``, then the stored message's id into its node's index."""
    with self.lock:  # re-entrant: the original takes it too
        message_id = _ORIGINAL["store_message_ins"](self, message)
        if message_id is not None and message_id in self.message_ins_store:
            _index(self).setdefault(message.metadata.dst_node_id, {})[message_id] = None
            _wake(self).set()
        return message_id


def get_message_ins(
    self: Any, node_id: int, limit: int | None, *, run_id: int | None = None
) -> list[Any]:
    """Flower's ``get_message_ins`` from the node's index: its undelivered messages (of
    ``run_id`` when given), at most ``limit``, in the order they were stored, each checked
    for expiry first, marked delivered."""
    from flwr.supercore.date import now

    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Any] = []
    with self.lock:
        pending = _index(self).get(node_id)
        if not pending:
            return found
        for msg_id in list(pending):
            msg = self.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                del pending[msg_id]  # replied to, deleted or delivered: never asked for again
                continue
            if run_id is not None and msg.metadata.run_id != run_id:
                continue
            self._check_stored_messages({msg_id})  # expired or left: deleted here
            if msg_id not in self.message_ins_store:
                del pending[msg_id]
                continue
            found.append(msg)
            del pending[msg_id]
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for msg in found:
        msg.metadata.delivered_at = delivered_at
    return found


def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
    """Flower's dispatch thread (``vce_api.add_messages_to_queue``: each pass hands every
    SuperNode's next message to the actors' queue), woken by a stored message instead of
    sleeping :data:`TICK_S` between passes. Flower's pass starts a round trip up to 0.1 s
    (0.05 s on average) after the ServerApp pushed it; a round of CNFGNN is nine round
    trips. A pass asks only the SuperNodes that the index holds undelivered messages for
    (the others would answer nothing), in Flower's order; it stops, as Flower's does,
    within :data:`TICK_S` of ``f_stop``."""
    wake = _wake(state)
    index = _index(state)
    while not f_stop.is_set():
        wake.clear()  # a message stored from here on wakes the next wait
        for node_id in nodes_mapping.keys():
            if index.get(node_id):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
        wake.wait(TICK_S)


_ORIGINAL: dict[str, Any] = {}
_REPLACED = {"store_message_ins": store_message_ins, "get_message_ins": get_message_ins}
_DISPATCH = "add_messages_to_queue"  # replaced in flwr's vce_api module


@contextlib.contextmanager
def fast_message_lookup(wake: bool = True) -> Iterator[bool]:
    """Within the block, Flower's in-memory LinkState uses :func:`store_message_ins` and
    :func:`get_message_ins`, and (``wake``) its simulation runtime
    :func:`add_messages_to_queue`; yields whether they do (False for a Flower release other
    than :data:`FLOWER_VERSION`)."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if _ORIGINAL:  # inside another block: already in place
        yield True
        return
    if flwr.__version__ != FLOWER_VERSION:
        log.debug("flwr %s: its own LinkState lookup is kept", flwr.__version__)
        yield False
        return
    for name, method in _REPLACED.items():
        _ORIGINAL[name] = InMemoryLinkState.__dict__[name]
        setattr(InMemoryLinkState, name, method)
    dispatch = getattr(vce_api, _DISPATCH)
    if wake:
        setattr(vce_api, _DISPATCH, add_messages_to_queue)  # run_api looks it up when it starts
    try:
        yield True
    finally:
        setattr(vce_api, _DISPATCH, dispatch)
        for name, method in _ORIGINAL.items():
            setattr(InMemoryLinkState, name, method)
        _ORIGINAL.clear()
