"""The in-process engine's clients on several cores: forked processes that run side by side.

One client per sensor does the same arithmetic as all sensors in one client, but in 207 small
passes instead of one batched pass. Those passes are too small for a second intra-op thread
(docs/benchmark.md), so :class:`InProcessEngine` leaves a core idle. :class:`ProcessEngine`
instead forks ``processes`` children after the workers are built; each keeps its share of the
clients (a contiguous block, balanced by sensors) and answers their messages with one torch
thread, while the parent runs the server on all of its threads when the clients wait.

Everything a child keeps lives only in that child, as on separate machines: the parent holds no
worker after the fork, and the payloads and replies cross a pipe (pickled numpy arrays), the
same dictionaries the other engines carry. A client that raises is a failed client, as in
:class:`InProcessEngine`; a child that dies fails the clients it hosted for the rest of the run.
The children are daemonic and are stopped by :meth:`ProcessEngine.close` (their recorded
process objects, never by name); a child whose parent vanished sees its pipe close and exits.

Linux/Unix only (``fork``), CPU only (a CUDA context does not survive a fork).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection, wait
from typing import Any, cast

import torch

from cnfgnn import optim, progress
from cnfgnn.data.errors import DataError
from cnfgnn.data.nodes import count_setting
from cnfgnn.federation import protocol as P
from cnfgnn.federation.fused import FusedClients

log = logging.getLogger(__name__)

#: Seconds :meth:`ProcessEngine.close` waits for a child to stop before it terminates it.
STOP_WAIT_S = 10.0


def fork_available() -> bool:
    """Whether this platform can fork (Linux, macOS), which :class:`ProcessEngine` needs."""
    return "fork" in mp.get_all_start_methods()


def client_processes(setting: Any, clients: int, threads: int, device: torch.device) -> int:
    """How many processes ``engine.processes`` gives ``clients`` clients.

    ``auto`` (or null): one per torch thread (``threads``), at most one per client, and 1 on a
    GPU or where fork is missing. A number: that many (at most one per client).

    Raises:
        DataError: a value that is not ``auto`` or a positive integer, or more than one
            process on a GPU or without fork; the message names the fix.
    """
    try:
        n = count_setting(setting, unset=("auto", "null", "none"))
    except ValueError:
        raise DataError(
            f"engine.processes={setting!r}: use a positive whole number of processes, or "
            "auto (one per torch thread). Fix: engine.processes=auto"
        ) from None
    if n is None:  # auto
        if device.type != "cpu" or not fork_available():
            return 1
        return max(1, min(int(clients), int(threads)))
    if n > 1 and device.type != "cpu":
        raise DataError(
            f"engine.processes={n} runs the clients in forked processes, which cannot share "
            f"device {device}. Fix: engine.processes=1 (or auto) with device={device}"
        )
    if n > 1 and not fork_available():
        raise DataError(
            f"engine.processes={n} needs fork, which this platform lacks. "
            "Fix: engine.processes=1 (or auto)"
        )
    return min(n, max(1, int(clients)))


def blocks(sizes: Mapping[int, int], parts: int) -> list[list[int]]:
    """Split the client ids (sorted) into ``parts`` contiguous blocks of about equal total size
    (``sizes``: client id -> its sensors); every block holds at least one client."""
    ids = sorted(sizes)
    parts = max(1, min(parts, len(ids)))
    total = sum(sizes.values())
    out: list[list[int]] = [[]]
    placed = 0  # sensors in the blocks so far
    for i, cid in enumerate(ids):
        to_open = parts - len(out)  # blocks not started yet
        full = placed >= len(out) * total / parts  # this block has its share
        if out[-1] and to_open > 0 and (full or len(ids) - i <= to_open):
            out.append([])
        out[-1].append(cid)
        placed += sizes[cid]
    return out


#: The block of workers the next forked child takes over. Set just before the fork and cleared
#: right after, so that only the child, by inheriting the parent's memory, keeps a reference
#: (an argument of the process would stay referenced by the parent's Process object).
_handoff: dict[int, Any] = {}
#: The parent's ends of the pipes, its own and those to the children forked before: a child
#: closes its copies, so that every child sees its pipe close as soon as the parent is gone.
_siblings: list[Connection] = []


def _serve(conn: Connection, threads: int, fuse: bool) -> None:
    """A child's loop: ``(message type, {client: payload})`` in, one ``(client, reply)`` out
    per client as it is done, until ``None`` or the pipe closes. ``fuse``: answer the
    clients' split steps and local training together (:mod:`cnfgnn.federation.fused`)."""
    workers = dict(_handoff)
    fused = FusedClients(workers) if fuse else None
    _handoff.clear()
    for other in _siblings:
        other.close()
    _siblings.clear()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(threads)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        mtype, payloads = msg
        together = {} if fused is None else fused.answer(mtype, payloads)
        for cid, payload in payloads.items():
            try:
                reply: Any = together.get(cid)
                if reply is None:
                    reply = workers[cid].handle(mtype, payload)
            except Exception as exc:  # a broken client costs its answer, not the run
                log.warning("client %s failed on %s: %s", cid, mtype, exc)
                log.debug("%s", traceback.format_exc())
                reply = P.ClientFailure(f"{type(exc).__name__}: {exc}")
            try:
                conn.send((cid, reply))
            except (BrokenPipeError, OSError):
                return
            except Exception as exc:  # a reply that cannot be pickled
                conn.send((cid, P.ClientFailure(f"reply not sendable: {exc}")))


class ProcessEngine:
    """The in-process engine's verbs, with the clients in ``processes`` forked children.

    Args:
        workers: client id -> its worker, built in this process; each child keeps its own
            block of them and this object keeps none.
        processes: children to fork (at most one per client).
        threads_each: torch threads in each child.
        fuse: each child answers its clients' split steps and local training in one pass
            (:mod:`cnfgnn.federation.fused`); the same replies.
    """

    def __init__(
        self, workers: dict[int, Any], processes: int, threads_each: int = 1, fuse: bool = False
    ):
        if not fork_available():
            raise RuntimeError("ProcessEngine needs fork (Linux or macOS)")
        sizes = {cid: len(w.series.nodes) for cid, w in workers.items()}
        self.ids = sorted(workers)
        self.blocks = blocks(sizes, processes)
        self.owner = {cid: i for i, block in enumerate(self.blocks) for cid in block}
        self.dead: dict[int, str] = {}  # child index -> why its clients fail
        self.busy = False  # a send is waiting for replies (close() then does not wait)
        optim.prepare()  # once here, not once per child inside round 1
        ctx = mp.get_context("fork")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        try:
            for i, block in enumerate(self.blocks):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(
                    target=_serve,
                    args=(child_end, threads_each, fuse),
                    name=f"cnfgnn-clients-{i}",
                    daemon=True,
                )
                _handoff.update({cid: workers[cid] for cid in block})
                _siblings.extend([*self.conns, parent_end])
                try:
                    proc.start()
                finally:
                    _handoff.clear()
                    _siblings.clear()
                child_end.close()
                self.conns.append(parent_end)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise
        log.debug(
            "clients in %d processes (pids %s), %d torch thread(s) each",
            len(self.procs),
            ", ".join(str(p.pid) for p in self.procs),
            threads_each,
        )

    @property
    def processes(self) -> int:
        """Client processes this engine forked."""
        return len(self.procs)

    @property
    def pids(self) -> list[int]:
        """Process ids of the children, in block order."""
        return [int(p.pid) for p in self.procs]

    def client_ids(self) -> list[int]:
        return list(self.ids)

    def _died(self, i: int) -> str:
        """Record that child ``i`` is gone; returns the reason its clients fail with."""
        if i not in self.dead:
            proc = self.procs[i]
            proc.join(timeout=1.0)
            code = proc.exitcode
            block = self.blocks[i]
            how = "" if code is None else f" with code {code}"
            self.dead[i] = f"client process {proc.pid} (clients {block[0]}-{block[-1]}) exited{how}"
            log.warning("%s; its clients are left out from now on", self.dead[i])
        return self.dead[i]

    def send(
        self, message_type: str, payloads: dict[int, P.Payload]
    ) -> dict[int, P.Payload | P.ClientFailure]:
        replies: dict[int, P.Payload | P.ClientFailure] = {}
        parts: dict[int, dict[int, P.Payload]] = {}
        for cid, payload in payloads.items():
            i = self.owner.get(cid)
            if i is None:
                replies[cid] = P.ClientFailure(f"no client {cid} in this engine")
            elif i in self.dead:
                replies[cid] = P.ClientFailure(self.dead[i])
            else:
                parts.setdefault(i, {})[cid] = payload
        waiting: dict[Connection, tuple[int, set[int]]] = {}
        self.busy = True
        for i, part in parts.items():
            try:
                self.conns[i].send((message_type, part))
                waiting[self.conns[i]] = (i, set(part))
            except (BrokenPipeError, OSError):
                reason = self._died(i)
                replies.update({cid: P.ClientFailure(reason) for cid in part})
        while waiting:
            for ready in wait(list(waiting)):
                conn = cast(Connection, ready)
                i, pending = waiting[conn]
                try:
                    cid, reply = conn.recv()
                except (EOFError, OSError):
                    reason = self._died(i)
                    replies.update({c: P.ClientFailure(reason) for c in pending})
                    del waiting[conn]
                    continue
                replies[int(cid)] = reply
                pending.discard(cid)
                if not pending:
                    del waiting[conn]
                progress.answered(len(replies), len(payloads))
        self.busy = False
        return replies

    def close(self) -> None:
        """Stop the children: ask, wait up to :data:`STOP_WAIT_S`, then terminate; idempotent.
        After an interrupted send (Ctrl-C, an error) they are terminated at once: they may
        still be working through their clients."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=0.0 if self.busy else STOP_WAIT_S)
            if proc.is_alive():
                log.warning("client process %s did not stop; terminating it", proc.pid)
                proc.terminate()
                proc.join(timeout=STOP_WAIT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for i, conn in enumerate(self.conns):
            conn.close()
            self.dead.setdefault(i, "the engine was closed")

    def __enter__(self) -> ProcessEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
