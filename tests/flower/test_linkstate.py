"""The indexed LinkState lookup (``cnfgnn.flower.linkstate``) answers as Flower's own.

Each test builds Flower's in-memory LinkState as ``flwr.simulation.run_simulation`` does (a
run, SuperNodes registered by the simulation runtime, messages pushed through the
ServerApp's grid), once with Flower's methods and once inside ``fast_message_lookup``, runs
the same calls on both and compares what comes back: the messages (by their content), their
order, the delivery stamps, and what is left in the store.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flwr.server.superlink.linkstate import InMemoryLinkState
from flwr.supercore.task_identity import TaskIdentity

from cnfgnn.flower import linkstate
from cnfgnn.flower.dispatch import RUN_ID, measure, push, simulation_state, to_queue

NODES = 5


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """simulation_state sets Flower's process-wide TaskIdentity: put it back afterwards."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))


def _federation() -> tuple[InMemoryLinkState, Any, list[int]]:
    state, grid, nodes = simulation_state(NODES)
    assert isinstance(state, InMemoryLinkState)
    return state, grid, nodes


def _tags(messages: list[Any]) -> list[int]:
    return [int(m.content["c"]["tag"]) for m in messages]


def _script(state: InMemoryLinkState, grid: Any, nodes: list[int]) -> list[Any]:
    """Pushes, lookups, replies and expiries in one order; returns every observation."""
    seen: list[Any] = []
    tag = 0
    for node in nodes:  # two messages for every node, interleaved
        for _ in range(2):
            push(grid, node, tag)
            tag += 1
    push(grid, nodes[1], 100, ttl=0.05)  # expires before its node asks
    time.sleep(0.1)
    seen.append([_tags(state.get_message_ins(node_id=n, limit=1)) for n in nodes])
    seen.append([_tags(state.get_message_ins(node_id=n, limit=None)) for n in nodes])
    seen.append([_tags(state.get_message_ins(node_id=n, limit=3)) for n in nodes])  # none left
    late = push(grid, nodes[2], 200)
    seen.append(_tags(state.get_message_ins(node_id=nodes[2], limit=5, run_id=99)))  # other run
    got = state.get_message_ins(node_id=nodes[2], limit=5, run_id=RUN_ID)
    seen.append(_tags(got))
    seen.append([m.metadata.delivered_at != "" for m in got])
    state.delete_messages({late})  # the server pulled its reply
    push(grid, nodes[0], 300)
    push(grid, nodes[0], 301)
    seen.append(_tags(state.get_message_ins(node_id=nodes[0], limit=2)))
    seen.append(len(state.message_ins_store))
    seen.append(sorted(_tags(list(state.message_ins_store.values()))))
    return seen


def _observe(within: Callable[[], Any] | None) -> list[Any]:
    state, grid, nodes = _federation()
    if within is None:
        return _script(state, grid, nodes)
    with within() as active:
        assert active
        return _script(state, grid, nodes)


def test_same_answers_as_flower() -> None:
    flower = _observe(None)
    indexed = _observe(linkstate.fast_message_lookup)
    assert indexed == flower
    # the script exercised what it claims: one message each at limit 1, the rest after it,
    # the expired one never handed out, another run's filter honoured
    assert flower[0] == [[0], [2], [4], [6], [8]]
    assert flower[1] == [[1], [3], [5], [7], [9]]
    assert flower[2] == [[]] * NODES
    assert flower[3] == [] and flower[4] == [200] and flower[5] == [True]
    assert 100 not in flower[8]


def test_methods_restored_and_version_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    before = {n: InMemoryLinkState.__dict__[n] for n in ("get_message_ins", "store_message_ins")}
    dispatch = vce_api.add_messages_to_queue
    with linkstate.fast_message_lookup() as active:
        assert active
        assert InMemoryLinkState.get_message_ins is linkstate.get_message_ins
        assert vce_api.add_messages_to_queue is linkstate.add_messages_to_queue
        with linkstate.fast_message_lookup() as inner:  # nested: still in place
            assert inner
        assert InMemoryLinkState.get_message_ins is linkstate.get_message_ins
    assert {n: InMemoryLinkState.__dict__[n] for n in before} == before
    assert vce_api.add_messages_to_queue is dispatch
    with linkstate.fast_message_lookup(wake=False):
        assert vce_api.add_messages_to_queue is dispatch
    with pytest.raises(RuntimeError), linkstate.fast_message_lookup():
        raise RuntimeError("a failed simulation")
    assert {n: InMemoryLinkState.__dict__[n] for n in before} == before
    assert vce_api.add_messages_to_queue is dispatch
    import flwr

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with linkstate.fast_message_lookup() as active:
        assert not active
        assert InMemoryLinkState.__dict__["get_message_ins"] is before["get_message_ins"]


def test_dispatch_benchmark_runs() -> None:
    """``python -m cnfgnn.flower.dispatch``: both lookups hand out every message."""
    for indexed in (False, True):
        rec = measure(6, indexed, repeats=1)
        assert set(rec) == {"handing_out_ms", "in_flight_ms"}
        assert all(v > 0 for v in rec.values())
    assert to_queue(4, indexed=True, wake=True, round_trips=2) > 0  # every message arrived


def _dispatching(state: Any, nodes: list[int]) -> tuple[queue.Queue[Any], Callable[[], None]]:
    """Start the woken dispatch thread on ``state``; returns its queue and a stop that
    joins it (and asserts that it stopped)."""
    ready: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    mapping = {node: i for i, node in enumerate(nodes)}
    thread = threading.Thread(
        target=linkstate.add_messages_to_queue, args=(state, ready, mapping, stop)
    )
    thread.start()

    def halt() -> None:
        stop.set()
        linkstate._wake(state).set()  # as in Flower, the stop is seen at the end of a wait
        thread.join(timeout=10)
        assert not thread.is_alive()

    return ready, halt


def test_woken_dispatch_keeps_flowers_passes() -> None:
    """Three messages per node: each pass hands out one per node, in Flower's node order,
    a node's in the order they were pushed, each message once."""
    with linkstate.fast_message_lookup():
        state, grid, nodes = _federation()
        for tag in range(3 * NODES):
            push(grid, nodes[tag % NODES], tag)
        ready, halt = _dispatching(state, nodes)
        try:
            got = _tags([ready.get(timeout=10) for _ in range(3 * NODES)])
        finally:
            halt()
    assert got == list(range(3 * NODES))
    assert ready.empty()


def test_woken_dispatch_does_not_wait_for_the_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round trips as the ServerApp sends them (one message per node, the next after the
    replies): a push wakes the waiting thread. The tick is made 60 s here, so a thread that
    waited it out would fail the 10-s gets."""
    monkeypatch.setattr(linkstate, "TICK_S", 60.0)
    with linkstate.fast_message_lookup():
        state, grid, nodes = _federation()
        ready, halt = _dispatching(state, nodes)
        try:
            trips = []
            for trip in range(3):
                time.sleep(0.2)  # the thread is waiting now
                assert ready.empty()
                for i, node in enumerate(nodes):
                    push(grid, node, trip * NODES + i)
                trips.append(_tags([ready.get(timeout=10) for _ in nodes]))
        finally:
            halt()
    assert trips == [[t * NODES + i for i in range(NODES)] for t in range(3)]


def test_lookup_cost_does_not_grow_with_other_nodes_messages() -> None:
    """A node's lookup reads its own index entries only: with 300 messages in flight for
    other nodes, Flower's lookup checks each of them, the indexed one none (counted calls
    of the expiry check, not seconds)."""
    calls = {"n": 0}
    original = InMemoryLinkState._check_stored_messages

    def counting(self: Any, ids: set[str], run_id: int | None = None) -> None:
        calls["n"] += 1
        original(self, ids, run_id)

    def lookups(within: Callable[[], Any] | None) -> int:
        state, grid, nodes = _federation()
        with within() if within else contextlib.nullcontext():
            for i in range(300):
                push(grid, nodes[i % (NODES - 1)], i)
            calls["n"] = 0
            InMemoryLinkState._check_stored_messages = counting  # type: ignore[method-assign]
            try:
                assert state.get_message_ins(node_id=nodes[-1], limit=1) == []
            finally:
                InMemoryLinkState._check_stored_messages = original  # type: ignore[method-assign]
        return calls["n"]

    assert lookups(None) >= 300
    assert lookups(linkstate.fast_message_lookup) == 0
