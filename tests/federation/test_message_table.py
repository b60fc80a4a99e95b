"""The message table (protocol.MESSAGES) drives the node's dispatch and both validators.

A new message type is one row plus one ``NodeWorker`` method: no edit of ``handle``,
``check_request`` or ``check_reply`` (the row names reusable schemas of validate.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import NodeWorker
from cnfgnn.federation.validate import (
    REPLY_SCHEMAS,
    REQUEST_SCHEMAS,
    MalformedMessage,
    check_reply,
)
from tests.helpers import TINY, in_process_federation, make_cfg

ECHO = "query.echo_batch"  # the fake new message type


def test_every_row_names_a_node_method_and_both_schemas():
    names = [m.name for m in P.MESSAGES]
    assert len(set(names)) == len(names), "a message type appears twice"
    assert P.MESSAGE_TYPES == tuple(names)
    assert len({m.method for m in P.MESSAGES}) == len(P.MESSAGES), "two rows, one method"
    for row in P.MESSAGES:
        assert callable(getattr(NodeWorker, row.method, None)), (row.name, row.method)
        assert row.request in REQUEST_SCHEMAS, (row.name, row.request)
        assert row.reply in REPLY_SCHEMAS, (row.name, row.reply)
        assert row.category in ("train", "evaluate", "query"), row.name
        assert P.message(row.name) is row
    assert P.message(P.IDENTIFY) is None  # answered by the ClientApp itself, not a node


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny federation after the handshake and configure (2 sensors per client)."""
    cfg = make_cfg(
        *TINY, f"output_root={tmp_path_factory.mktemp('mt')}", "federation.nodes_per_client=2"
    )
    _, workers, orch = in_process_federation(cfg)
    return workers[0], orch


def test_a_new_row_and_method_are_dispatched_and_validated(setup, monkeypatch):
    worker, orch = setup
    m = worker.cfg.model
    k, lay, hid = worker.num_nodes, int(m.num_layers), int(m.hidden_size)
    batch = np.array([0, 2, 5], np.int32)  # the validator normalises it to int64
    with pytest.raises(MalformedMessage, match="unknown message type"):
        worker.handle(ECHO, {P.BATCH: batch})

    seen: list[P.Payload] = []

    def echo_batch(self: NodeWorker, payload: P.Payload) -> P.Payload:
        seen.append(payload)
        return {P.H_C: np.zeros((len(payload[P.BATCH]), self.num_nodes, lay, hid), np.float32)}

    # the only two edits a new type needs: one row, one node method
    row = P.MessageType(
        ECHO,
        True,
        "BATCH",
        "H_C [B, K, L, H]",
        method="echo_batch",
        request="batch",
        reply="h_c_of_batch",
    )
    monkeypatch.setattr(P, "MESSAGES", P.MESSAGES + (row,))
    monkeypatch.setattr(NodeWorker, "echo_batch", echo_batch, raising=False)

    reply = worker.handle(ECHO, {P.BATCH: batch})
    assert len(seen) == 1 and seen[0][P.BATCH].dtype == np.int64  # checked before dispatch
    assert reply[P.H_C].shape == (3, k, lay, hid)
    lim = orch._reply_limits()
    request = {P.BATCH: batch}
    assert check_reply(ECHO, request, reply, k, lim)[P.H_C].shape == (3, k, lay, hid)

    # the request schema the row names is enforced: out-of-range windows, unknown keys
    s = len(worker.series.starts[P.TRAIN])
    for bad in ({P.BATCH: np.array([0, s], np.int64)}, {P.BATCH: batch, "junk": 1}, {}):
        with pytest.raises(MalformedMessage, match=ECHO):
            worker.handle(ECHO, bad)
    assert len(seen) == 1, "a malformed request reached the handler"
    # ... and so is the reply schema: shape against the batch asked, unknown keys, NaN
    wrong = {P.H_C: np.zeros((2, k, lay, hid), np.float32)}
    nan = {P.H_C: np.full((3, k, lay, hid), np.nan, np.float32)}
    for bad_reply in (wrong, reply | {P.GRAD: reply[P.H_C]}, nan, {}):
        with pytest.raises(MalformedMessage, match=ECHO):
            check_reply(ECHO, request, bad_reply, k, lim)

    # the row's flags are read too: a type that needs configure is refused before it
    fresh = NodeWorker(worker.series, worker.cfg)
    with pytest.raises(MalformedMessage, match="configure"):
        fresh.handle(ECHO, {P.BATCH: batch})
