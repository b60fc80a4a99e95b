"""What one dispatch pass of Flower's simulation runtime costs at N SuperNodes.

The runtime asks the in-memory LinkState, every 0.1 s, for the next message of each
SuperNode (``get_message_ins(node, limit=1)``); see :mod:`cnfgnn.flower.linkstate`. This
builds the state as ``flwr.simulation.run_simulation`` does, with one message in flight per
node, and times two passes over all nodes with Flower's lookup and with the index:

* ``handing_out_ms``: the pass that finds and delivers the N messages;
* ``in_flight_ms``: a pass while they are delivered but not yet answered (the state during
  a round trip: this pass repeats every 0.1 s until the replies are in);
* ``to_queue_ms``: the runtime's dispatch thread running, from the push of one message per
  node to the last of them in the actors' queue (mean over round trips pushed at
  spread-out moments of Flower's 0.1-s tick); ``to_queue_woken_ms``: the same with the
  thread that a push wakes (:func:`cnfgnn.flower.linkstate.add_messages_to_queue`).

``python -m cnfgnn.flower.dispatch 207 1000`` prints one JSON line per node count.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
from typing import Any

from cnfgnn.flower import linkstate

RUN_ID = 7
TASK_ID = 11


def simulation_state(nodes: int) -> tuple[Any, Any, list[int]]:
    """``(state, grid, node ids)``: Flower's in-memory LinkState with one run and ``nodes``
    registered SuperNodes, and the ServerApp's grid on it, as a simulation starts them.
    Sets Flower's process-wide ``TaskIdentity`` to the ServerApp's (new messages take it)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    TaskIdentity.task_id, TaskIdentity.run_id = 1, RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    factory = LinkStateFactory(":flwr-in-memory:", NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id = TASK_ID
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)  # type: ignore[attr-defined]
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=run.run_id)  # type: ignore[attr-defined]
    ids = sorted(_register_nodes(nodes, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, ids


def push(grid: Any, node: int, tag: int, ttl: float = 600.0) -> str:
    """Push one ``query`` message tagged ``tag`` to ``node``; returns its message id."""
    from flwr.app import ConfigRecord, Message, RecordDict

    content = RecordDict({"c": ConfigRecord({"tag": tag})})
    (mid,) = grid.push_messages(
        [Message(content, dst_node_id=node, message_type="query.t", ttl=ttl)]
    )
    return str(mid)


def measure(nodes: int, indexed: bool, repeats: int = 5) -> dict[str, float]:
    """Milliseconds of the two passes (see the module docstring) at ``nodes`` SuperNodes."""
    with linkstate.fast_message_lookup() if indexed else contextlib.nullcontext():
        state, grid, ids = simulation_state(nodes)
        for i, node in enumerate(ids):
            push(grid, node, i)
        t0 = time.perf_counter()
        handed = sum(len(state.get_message_ins(node_id=n, limit=1)) for n in ids)
        first = time.perf_counter() - t0
        if handed != nodes:
            raise RuntimeError(f"{handed} of {nodes} messages handed out")
        t0 = time.perf_counter()
        for _ in range(repeats):
            sum(len(state.get_message_ins(node_id=n, limit=1)) for n in ids)
        idle = (time.perf_counter() - t0) / repeats
    return {"handing_out_ms": 1000 * first, "in_flight_ms": 1000 * idle}


def to_queue(nodes: int, indexed: bool, wake: bool, round_trips: int = 7) -> float:
    """Mean milliseconds from pushing one message per node to the last one in the queue
    that the actors take from, with the runtime's dispatch thread running (``wake``: the
    one woken by a push, with the index)."""
    from flwr.server.superlink.fleet.vce import vce_api

    lookup = linkstate.fast_message_lookup(wake) if indexed else contextlib.nullcontext()
    with lookup:
        state, grid, ids = simulation_state(nodes)
        ready: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        mapping = {node: i for i, node in enumerate(ids)}
        thread = threading.Thread(
            target=vce_api.add_messages_to_queue, args=(state, ready, mapping, stop), daemon=True
        )
        thread.start()
        waits = []
        try:
            for trip in range(round_trips):
                time.sleep(linkstate.TICK_S * (1 + trip / round_trips))  # another tick phase
                t0 = time.perf_counter()
                for i, node in enumerate(ids):
                    push(grid, node, trip * nodes + i)
                for _ in ids:
                    ready.get(timeout=30)
                waits.append(time.perf_counter() - t0)
        finally:
            stop.set()
            thread.join()
    return 1000 * sum(waits) / len(waits)


def main(argv: list[str]) -> None:
    for nodes in [int(a) for a in argv] or [207, 1000]:
        rec: dict[str, Any] = {"nodes": nodes}
        for name, indexed in (("flower", False), ("indexed", True)):
            rec[name] = {k: round(v, 2) for k, v in measure(nodes, indexed).items()}
            rec[name]["to_queue_ms"] = round(to_queue(nodes, indexed, wake=False), 2)
        rec["indexed"]["to_queue_woken_ms"] = round(to_queue(nodes, True, wake=True), 2)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
