"""federation.exchange: the one send/check/count path of training and inference."""

from __future__ import annotations

import time

import numpy as np

from cnfgnn.federation import protocol as P
from cnfgnn.federation.exchange import exchange
from cnfgnn.federation.validate import MalformedMessage


class FixedEngine:
    """Answers every send with the replies it was built with."""

    def __init__(self, replies):
        self.replies, self.sent = replies, []

    def client_ids(self):
        return list(self.replies)

    def send(self, mtype, payloads):
        self.sent.append((mtype, payloads))
        time.sleep(0.01)  # the exchange must time the engine's send
        return {c: r for c, r in self.replies.items() if c in payloads}


def test_exchange_keeps_good_replies_and_names_every_failure():
    good = {P.H_C: np.ones((2, 3), np.float32)}
    engine = FixedEngine({0: good, 1: P.ClientFailure("boom"), 2: {"bad": 1}})

    def check(cid, request, reply):
        if "bad" in reply:
            raise MalformedMessage("unexpected key 'bad'")
        return reply

    down = {P.BATCH: np.arange(4)}
    ex = exchange(engine, P.SL_ENCODE, {0: down, 1: down, 2: down, 3: down}, check)
    assert list(ex.replies) == [0] and ex.replies[0] is good
    assert ex.failed == {1: "boom", 2: "bad reply: unexpected key 'bad'", 3: "no reply"}
    assert ex.down == [0, 4 * down[P.BATCH].nbytes]  # int64 arrays count as "other"
    assert ex.up == [good[P.H_C].nbytes, 0]  # only the accepted reply
    assert engine.sent[0][0] == P.SL_ENCODE and ex.seconds >= 0.01
