"""Live progress of a run: a tqdm bar per phase, windows/s and ETA (docs/design.md §5 phases).

The orchestrator opens a phase around a send (:func:`send`) or around a server loop
(:func:`phase`); the node-side loops call :func:`advance` with the windows they finished,
and engines call :func:`answered` as clients reply. A bar counts windows of the phase
(one client's window = 1), so local training, encoding, the split-learning epoch and
evaluation all show windows/s; with a remote engine (Flower) the nodes' own loops run
elsewhere and the bar moves as clients answer, showing ``k/N clients``.

``progress: auto`` (``conf/config.yaml``) shows bars when stderr is a terminal; otherwise a
phase that runs long logs ``k/N clients`` lines instead (at most one per
:data:`TEXT_INTERVAL_S`), so a deployment's ServerApp log says how far a phase has got.
``progress: false`` is silent; ``true`` forces bars. The one summary line per round is
logged by the orchestrator and kept in ``run.log``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between ``k/N clients`` log lines of one phase when no bar is shown.
TEXT_INTERVAL_S = 15.0
#: Bar width and screen height when the terminal does not report them.
FALLBACK_SIZE = (100, 40)
_MODES = {"auto": None, "true": True, "false": False, "none": None}
_mode: bool | None = None  # None: auto
_stack: list[_Phase] = []


def configure(setting: Any) -> None:
    """``auto`` | ``true`` | ``false`` (strings or bools; ``null`` = auto)."""
    global _mode
    if setting is None or isinstance(setting, bool):
        _mode = setting
        return
    key = str(setting).strip().lower()
    if key not in _MODES:
        raise ValueError(f"progress={setting!r}: use auto, true or false")
    _mode = _MODES[key]


def bars_on() -> bool:
    """Whether bars are drawn: forced by ``progress: true``, else stderr is a terminal."""
    if _mode is not None:
        return _mode
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _size() -> tuple[int | None, int | None]:
    """``(columns, rows)`` for tqdm: None to follow the terminal; fixed values where the
    terminal reports no size (a pseudo-terminal without one would hide every bar)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return FALLBACK_SIZE
    return (
        (size.columns or FALLBACK_SIZE[0], size.lines or FALLBACK_SIZE[1])
        if not (size.columns and size.lines)
        else (None, None)
    )


class _Phase:
    """One phase's counter: a tqdm bar, or throttled log lines when bars are off."""

    def __init__(self, name: str, total: int | None, unit: str, clients: int | None):
        self.name, self.total, self.unit, self.clients = name, total, unit, clients
        self.done = 0
        self.t0 = self.last_text = time.monotonic()
        self.bar = None
        if bars_on():
            from tqdm import tqdm

            cols, rows = _size()
            self.bar = tqdm(
                total=total,
                desc=name,
                unit=unit,
                leave=False,
                file=sys.stderr,
                dynamic_ncols=cols is None,
                ncols=cols,
                nrows=rows,
                mininterval=0.25,
                smoothing=0.1,
            )

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def answered(self, k: int, n: int) -> None:
        if self.bar is not None:  # before the move below, which redraws the bar
            self.bar.set_postfix_str(f"{k}/{n} clients", refresh=False)
        if self.clients is not None and self.total:  # remote nodes: move by clients
            target = round(self.total * k / max(n, 1))
            if target > self.done:
                self.advance(target - self.done)
        if self.bar is not None:
            return
        if _mode is not False and time.monotonic() - self.last_text >= TEXT_INTERVAL_S:
            self.last_text = time.monotonic()
            log.info(
                "  %s: %d/%d clients answered (%.0f s)", self.name, k, n, time.monotonic() - self.t0
            )

    def close(self) -> None:
        seconds = time.monotonic() - self.t0
        if self.bar is not None:
            self.bar.close()
        rate = f", {self.done / seconds:.0f} {self.unit}/s" if self.done and seconds > 0 else ""
        log.debug("%s: %d %s in %.2f s%s", self.name, self.done, self.unit, seconds, rate)


@contextmanager
def phase(
    name: str, total: int | None = None, unit: str = "win", clients: int | None = None
) -> Iterator[_Phase]:
    """Count a phase's work: ``total`` units (windows); ``clients`` when the bar should
    also move as that many clients answer (their own loops run elsewhere)."""
    p = _Phase(name, total, unit, clients)
    _stack.append(p)
    try:
        yield p
    finally:
        _stack.remove(p)
        p.close()


def advance(n: int = 1) -> None:
    """``n`` more units of the innermost open phase are done (no-op when none is open)."""
    if _stack:
        _stack[-1].advance(int(n))


def answered(k: int, n: int) -> None:
    """``k`` of the ``n`` clients sent in the innermost open phase have answered."""
    if _stack:
        _stack[-1].answered(k, n)


def send(
    phase_name: str,
    message_type: str,
    payloads: Mapping[int, Mapping[str, Any]],
    num_windows: Mapping[str, int],
    local_epochs: int,
) -> AbstractContextManager[Any]:
    """The phase of one orchestrator send: a bar for the sends that loop over a node's
    windows (local training, encoding, evaluation), nothing for the others (the
    split-learning steps count in their epoch's phase)."""
    from cnfgnn.federation import protocol as P

    if not payloads or not num_windows:
        return nullcontext()
    first = next(iter(payloads.values()))
    if message_type == P.LOCAL_TRAIN:
        per_client = int(num_windows.get(P.TRAIN, 0)) * int(local_epochs)
        name = phase_name
    elif message_type in (P.ENCODE, P.EVALUATE):
        split = str(first.get(P.SPLIT, P.TRAIN))
        per_client = int(num_windows.get(split, 0))
        if message_type == P.EVALUATE and P.H_G not in first:  # the node encodes there too
            per_client *= 2
        name = (
            phase_name
            if message_type == P.EVALUATE or phase_name == "encode"
            else f"{phase_name} encode"
        )
    else:
        return nullcontext()
    return phase(name, per_client * len(payloads), clients=len(payloads))
