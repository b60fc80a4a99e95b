"""The Flower engine: the orchestration's ``send`` over a Flower ``Grid``.

Works with any Grid (simulation's in-memory Grid, a deployment's SuperLink): it only uses
``get_node_ids``, ``push_messages`` and ``pull_messages``.

* Client ids are the clients' ``partition-id``s, never Flower node ids (a restarted
  SuperNode comes back under a new node id). A ``query.identify`` message maps them; it is
  sent again to any node id not seen before, so a restarted SuperNode is picked up.
* One message per client per ``send``; replies are pulled every ``poll_interval_s`` until
  all are in or ``timeout_s`` has passed.
* An error reply (the ClientApp raised, the node died) or no reply in time becomes a
  :class:`~cnfgnn.federation.protocol.ClientFailure`. Error replies are matched to clients
  through ``reply_to_message_id`` (their ``src_node_id`` may be the SuperLink's).
* Bytes as Flower carries them (serialized arrays, keys, config values) are counted per
  message type and direction in ``wire_bytes``; round trips and their seconds too.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from flwr.app import Message

from cnfgnn import progress
from cnfgnn.federation import protocol as P
from cnfgnn.federation.secure import SecureSum
from cnfgnn.flower import secagg
from cnfgnn.flower.codec import pack, unpack, wire_nbytes
from cnfgnn.shell import UsageError

log = logging.getLogger(__name__)


def _short(reason: str, limit: int = 300) -> str:
    """The useful end of an error reason (Ray wraps the ClientApp's traceback in it)."""
    reason = str(reason)
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1].rstrip("'>\n ")
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


class FlowerError(RuntimeError):
    """The federation cannot start (too few SuperNodes, inconsistent partitions)."""


def busy_share(value: Any) -> float | None:
    """``engine.poll_busy_share`` checked: a share in (0, 1], or None.

    Raises:
        UsageError: anything else (the message names the key and the fix).
    """
    if value is None:
        return None
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 < share <= 1.0:
        raise UsageError(
            f"engine.poll_busy_share={value}: use a share in (0, 1], or null. "
            "Fix: engine.poll_busy_share=0.05"
        )
    return share


class FlowerEngine:
    """Engine over a Flower ``Grid``.

    A node id that fails to identify itself is asked again at the next ``send``, at most
    ``MAX_IDENTIFY_TRIES`` times.

    Args:
        grid: the ServerApp's grid.
        timeout_s: seconds to wait for the replies of one ``send``.
        poll_interval_s: seconds between pulls.
        poll_busy_share: at most this share of the wait goes to pulling: after a pull that
            took ``t`` seconds the next waits at least ``t * (1 / share - 1)`` (a pull's cost
            grows with the replies pending: 0.8 ms at 207 clients, 3.8 ms at 1,000 in
            simulation). None: every ``poll_interval_s``.
        expected_clients: clients to wait for before the first message (None: whatever
            is connected once the number of nodes stops changing).
        wait_for_nodes_s: how long to wait for them.
        measure_wire_bytes: count serialized bytes per message type.
        progress: one-line progress sink.
    """

    MAX_IDENTIFY_TRIES = 3
    #: The FedAvg phase can go through Flower's SecAgg+ (:meth:`secure_mean`).
    secure_aggregation = True

    def __init__(
        self,
        grid: Any,
        timeout_s: float = 600.0,
        poll_interval_s: float = 0.02,
        poll_busy_share: float | None = None,
        expected_clients: int | None = None,
        wait_for_nodes_s: float = 120.0,
        measure_wire_bytes: bool = True,
        progress: Callable[[str], None] = log.info,
    ):
        self.grid = grid
        self.timeout_s = float(timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        self.poll_busy_share = busy_share(poll_busy_share)
        self.expected_clients = expected_clients
        self.wait_for_nodes_s = float(wait_for_nodes_s)
        self.measure_wire_bytes = measure_wire_bytes
        self.progress = progress
        self.node_of: dict[int, int] = {}  # client (partition id) -> Flower node id
        self.num_partitions: int | None = None
        self.wire_bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.round_trips: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self._seen: set[int] = set()  # node ids already asked who they are
        self._tries: dict[int, int] = defaultdict(int)  # failed identifications per node id
        self._left: set[int] = set()  # clients whose node left the federation

    @classmethod
    def from_config(
        cls,
        grid: Any,
        eng: Any,
        expected_clients: int | None,
        progress: Callable[[str], None] = log.info,
    ) -> FlowerEngine:
        """An engine with the settings of ``cfg.engine`` (``eng``)."""
        return cls(
            grid,
            timeout_s=float(eng.get("timeout_s", 600)),
            poll_interval_s=float(eng.get("poll_interval_s", 0.02)),
            poll_busy_share=eng.get("poll_busy_share"),
            expected_clients=expected_clients,
            wait_for_nodes_s=float(eng.get("wait_for_nodes_s", 120)),
            measure_wire_bytes=bool(eng.get("measure_wire_bytes", True)),
            progress=progress,
        )

    # ------------------------------------------------------------------ Engine protocol
    def client_ids(self) -> list[int]:
        if not self.node_of:
            self._wait_for_nodes()
        self._refresh()
        if self.expected_clients is not None and len(self.node_of) < self.expected_clients:
            missing = sorted(set(range(self.expected_clients)) - set(self.node_of))
            raise FlowerError(
                f"{len(self.node_of)} of {self.expected_clients} clients "
                f"identified; missing partitions {missing[:20]}"
            )
        return sorted(self.node_of)

    def send(
        self, message_type: str, payloads: dict[int, P.Payload]
    ) -> dict[int, P.Payload | P.ClientFailure]:
        self._refresh()
        replies: dict[int, P.Payload | P.ClientFailure] = {}
        messages: dict[int, Message] = {}
        for cid, payload in payloads.items():
            node = self.node_of.get(cid)
            if node is None:
                replies[cid] = P.ClientFailure("client not connected")
                continue
            content = pack(payload)
            if self.measure_wire_bytes:
                self.wire_bytes[message_type]["down"] += wire_nbytes(content)
            messages[cid] = Message(
                content, dst_node_id=node, message_type=message_type, ttl=self.timeout_s + 60.0
            )
        t0 = time.perf_counter()
        raw = self._round_trip(messages)
        self.seconds[message_type] += time.perf_counter() - t0
        self.round_trips[message_type] += 1
        for cid, reply in raw.items():
            if isinstance(reply, P.ClientFailure):
                replies[cid] = reply
            elif reply.has_error():
                replies[cid] = P.ClientFailure(
                    f"error reply (code {reply.error.code}): {_short(reply.error.reason)}"
                )
            else:
                if self.measure_wire_bytes:
                    self.wire_bytes[message_type]["up"] += wire_nbytes(reply.content)
                replies[cid] = unpack(reply.content)
        return replies

    def secure_mean(
        self, message_type: str, payloads: dict[int, P.Payload], settings: Any
    ) -> SecureSum:
        """The mean of the clients' FedAvg contributions through SecAgg+ (the server never
        sees one); see :mod:`cnfgnn.flower.secagg`. Bytes and seconds are counted under the
        legacy message type ``train`` that carries the phase."""
        if message_type != P.LOCAL_TRAIN:
            raise ValueError(f"secure aggregation carries {P.LOCAL_TRAIN} only, not {message_type}")
        self._refresh()
        round_no = int(next(iter(payloads.values())).get(P.ROUND, 0))
        result = secagg.secure_mean(
            self.grid, self.node_of, payloads, settings, round_no, self.timeout_s
        )
        if self.measure_wire_bytes:
            self.wire_bytes[secagg.SECAGG_TYPE]["down"] += result.bytes_down
            self.wire_bytes[secagg.SECAGG_TYPE]["up"] += result.bytes_up
        self.seconds[secagg.SECAGG_TYPE] += result.seconds
        self.round_trips[secagg.SECAGG_TYPE] += result.round_trips
        return result

    # ------------------------------------------------------------------ transport
    def _round_trip(
        self, messages: dict[int, Message], timeout_s: float | None = None
    ) -> dict[int, Message | P.ClientFailure]:
        """Push one message per client, pull until all replied or the timeout passed."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        out: dict[int, Message | P.ClientFailure] = {}
        if not messages:
            return out
        cids = list(messages)
        msgs = [messages[c] for c in cids]
        returned = list(self.grid.push_messages(msgs))
        if len(returned) == len(msgs):
            ids = [str(r) if r else None for r in returned]
        else:  # a grid that drops refused messages from its answer
            accepted = {str(r) for r in returned if r}
            ids = [
                m.metadata.message_id if m.metadata.message_id in accepted else None for m in msgs
            ]
        pending: dict[str, int] = {}
        for cid, mid in zip(cids, ids):
            if mid is None:
                out[cid] = P.ClientFailure("the SuperLink refused the message")
            else:
                pending[mid] = cid
        deadline = time.monotonic() + timeout_s
        while pending:
            t_pull = time.monotonic()
            for reply in self.grid.pull_messages(list(pending)):
                cid = pending.pop(reply.metadata.reply_to_message_id, None)
                if cid is not None:
                    out[cid] = reply
            progress.answered(len(out), len(cids))
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self._poll_wait(time.monotonic() - t_pull))
        for cid in pending.values():
            out[cid] = P.ClientFailure(f"no reply within {timeout_s:g} s")
        return out

    def _poll_wait(self, pull_s: float) -> float:
        """Seconds to wait after a pull that took ``pull_s`` (see ``poll_busy_share``)."""
        if self.poll_busy_share is None:
            return self.poll_interval_s
        return max(self.poll_interval_s, pull_s * (1.0 / self.poll_busy_share - 1.0))

    # ------------------------------------------------------------------ identities
    def _wait_for_nodes(self) -> None:
        """Block until the expected SuperNodes are connected (or their number settles)."""
        t_end = time.monotonic() + self.wait_for_nodes_s
        last, stable_since = -1, time.monotonic()
        while True:
            n = len(list(self.grid.get_node_ids()))
            now = time.monotonic()
            if n != last:
                last, stable_since = n, now
            if self.expected_clients is not None and n >= self.expected_clients:
                return
            if self.expected_clients is None and n > 0 and now - stable_since >= 3.0:
                return
            if now >= t_end:
                if n == 0 or self.expected_clients is not None:
                    raise FlowerError(
                        f"{n} SuperNodes connected after {self.wait_for_nodes_s:g}"
                        f" s; expected {self.expected_clients or 'at least 1'}"
                    )
                return
            time.sleep(0.1)

    def _refresh(self) -> None:
        """Forget node ids that left; ask new node ids which client they are."""
        live = set(int(n) for n in self.grid.get_node_ids())
        for cid, node in list(self.node_of.items()):
            if node not in live:
                self.progress(f"  client {cid} (node {node}) left the federation")
                del self.node_of[cid]
                self._left.add(cid)
        new = sorted(n for n in live - self._seen if self._tries[n] < self.MAX_IDENTIFY_TRIES)
        if not new:
            return
        self._seen.update(new)
        # the first identification may wait for cold workers (Ray actors start, torch imports)
        wait = max(self.timeout_s, self.wait_for_nodes_s) if not self.node_of else self.timeout_s
        msgs = {
            node: Message(pack({}), dst_node_id=node, message_type=P.IDENTIFY, ttl=wait + 60.0)
            for node in new
        }
        replies = self._round_trip(msgs, wait)
        for node, reply in replies.items():
            if isinstance(reply, P.ClientFailure) or reply.has_error():
                reason = reply.reason if isinstance(reply, P.ClientFailure) else reply.error.reason
                log.warning("node %s did not identify itself: %s", node, _short(reason))
                self._tries[node] += 1
                self._seen.discard(node)  # ask again at the next send (a few times)
                continue
            info = unpack(reply.content)
            cid, n = int(info[P.PARTITION_ID]), int(info[P.NUM_PARTITIONS])
            if n >= 0:
                if self.num_partitions is not None and n != self.num_partitions:
                    raise FlowerError(
                        f"node {node} says num-partitions={n}, others {self.num_partitions}"
                    )
                self.num_partitions = n
            old = self.node_of.get(cid)
            if old is not None and old != node:  # a restarted SuperNode: the newest wins
                self.progress(f"  client {cid} is now node {node} (was {old})")
            elif old is None and cid in self._left:  # it came back after it was dropped
                self.progress(f"  client {cid} rejoined as node {node}")
            self.node_of[cid] = node
        if (
            self.expected_clients is not None
            and self.num_partitions is not None
            and self.num_partitions != self.expected_clients
        ):
            raise FlowerError(
                f"SuperNodes have num-partitions={self.num_partitions} but the "
                f"config gives {self.expected_clients} clients"
            )

    # ------------------------------------------------------------------ accounting
    def stats(self) -> dict[str, Any]:
        """Serialized bytes per message type and direction, round trips, seconds."""
        return {
            "wire_bytes": {k: dict(v) for k, v in self.wire_bytes.items()},
            "wire_bytes_total": int(sum(sum(v.values()) for v in self.wire_bytes.values())),
            "round_trips": dict(self.round_trips),
            "round_trip_seconds": dict(self.seconds),
        }
