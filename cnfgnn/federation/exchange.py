"""One send to the clients, the same for training and inference: send, time, check every
reply against its schema, count bytes both ways. A client that failed, did not answer or
sent a malformed reply is returned as failed (with the reason), never raised."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cnfgnn.federation import protocol as P
from cnfgnn.federation.engines import Engine
from cnfgnn.federation.validate import MalformedMessage

#: ``check(client id, request, reply) -> reply`` (raises :class:`MalformedMessage`).
ReplyCheck = Callable[[int, P.Payload, P.Payload], P.Payload]


@dataclass
class Exchange:
    """What one send produced.

    Attributes:
        replies: accepted replies by client id.
        failed: reason by client id (error, no reply, or a malformed reply).
        down, up: ``[tensor_bytes, other_bytes]`` sent and accepted (see
            :func:`cnfgnn.federation.protocol.payload_nbytes`).
        seconds: wall time of the engine's send.
    """

    replies: dict[int, P.Payload] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    down: list[int] = field(default_factory=lambda: [0, 0])
    up: list[int] = field(default_factory=lambda: [0, 0])
    seconds: float = 0.0


def exchange(
    engine: Engine, mtype: str, payloads: dict[int, P.Payload], check: ReplyCheck
) -> Exchange:
    """Send ``payloads`` (client id -> request) as ``mtype`` and check every reply."""
    out = Exchange()
    for p in payloads.values():
        f, o = P.payload_nbytes(p)
        out.down[0] += f
        out.down[1] += o
    t0 = time.perf_counter()
    replies = engine.send(mtype, payloads)
    out.seconds = time.perf_counter() - t0
    for cid in payloads:
        reply = replies.get(cid, P.ClientFailure("no reply"))
        if not isinstance(reply, P.ClientFailure):  # a bad reply counts as no reply
            try:
                reply = check(cid, payloads[cid], reply)
            except MalformedMessage as exc:
                reply = P.ClientFailure(f"bad reply: {exc}")
        if isinstance(reply, P.ClientFailure):
            out.failed[cid] = reply.reason
            continue
        f, o = P.payload_nbytes(reply)
        out.up[0] += f
        out.up[1] += o
        out.replies[cid] = reply
    return out
