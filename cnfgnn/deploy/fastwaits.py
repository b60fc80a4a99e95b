"""Shorten Flower 1.42's fixed waits inside a SuperNode process, at run time.

A SuperNode (``flwr/supernode/start_client_internal.py``) handles one message at a time and
has three waits that are constants, not settings (docs/deployment.md §5):

* ``time.sleep(3)`` after each poll of the SuperLink that found no message;
* ``time.sleep(0.5)`` steps while it waits for the ClientApp's reply and for the reply's
  objects;
* ``pull_objects(..., initial_backoff=1 s)`` when a message's objects are not uploaded yet.

Each costs up to its full length per round trip. :func:`patch_supernode` rebinds, in this
process only, the ``time`` module and ``pull_objects`` names that module uses, so those waits
become ``hot_poll_s`` (for ``hot_s`` seconds after the last message, since a federation sends
in bursts) or ``idle_poll_s`` (otherwise) / ``reply_poll_s`` / ``object_backoff_s``; no
Flower file is edited. Every poll is an HTTP request to the one SuperLink process, so the
idle pause stays long: polling fast all the time costs the SuperLink CPU (about 3.5 ms per
request measured on 2 cores).
It also lets a SuperNode announce a shorter heartbeat interval (the SuperLink declares a
node dead after 2 missed intervals; Flower's is 30 s).

These are Flower internals: :func:`check_targets` verifies the exact version and the source
lines the patch relies on, and raises when they changed (tests call it). On a Flower version
other than ``FLOWER_VERSION``, :func:`patch_supernode` changes nothing and warns: the
SuperNode runs with Flower's own waits (slower rounds, same results).
"""

from __future__ import annotations

import functools
import inspect
import time as _time
import warnings
from dataclasses import dataclass
from typing import Any

FLOWER_VERSION = "1.42.0"
IDLE_SLEEP = 3  # the literals in start_client_internal.py that are rescaled
REPLY_SLEEP = 0.5


class PatchError(RuntimeError):
    """Flower's internals are not what the patch expects."""


@dataclass(frozen=True)
class Waits:
    """Seconds that replace Flower's fixed waits (None: keep Flower's)."""

    idle_poll_s: float | None = None
    reply_poll_s: float | None = None
    object_backoff_s: float | None = None
    heartbeat_s: float | None = None
    hot_poll_s: float | None = None
    hot_s: float = 3.0


class _ScaledTime:
    """The ``time`` module, except that ``sleep(3)`` and ``sleep(0.5)`` are shortened.

    ``sleep(3)`` (no message found) lasts ``hot`` seconds while the last ``sleep(0.5)``
    (waiting for a ClientApp's reply, i.e. a message was being handled) is less than
    ``hot_s`` old, else ``mapping[3]``.
    """

    def __init__(self, mapping: dict[float, float], hot: float | None = None, hot_s: float = 0.0):
        self._mapping, self._hot, self._hot_s = mapping, hot, hot_s
        self._last_busy = -float("inf")

    def sleep(self, seconds: float) -> None:
        if seconds == REPLY_SLEEP:
            self._last_busy = _time.monotonic()
        elif (
            seconds == IDLE_SLEEP
            and self._hot is not None
            and _time.monotonic() - self._last_busy < self._hot_s
        ):
            _time.sleep(self._hot)
            return
        _time.sleep(self._mapping.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def flower_version() -> str | None:
    """The installed Flower's version string."""
    import flwr

    return getattr(flwr, "__version__", None)


def check_targets() -> None:
    """Raise :class:`PatchError` unless Flower is the version whose internals are patched."""
    import flwr
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fhc
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    version = getattr(flwr, "__version__", None)
    if version != FLOWER_VERSION:
        raise PatchError(
            f"flwr {version} installed; cnfgnn/deploy/fastwaits.py patches {FLOWER_VERSION}. "
            "Fix: re-check the waits in flwr/supernode/start_client_internal.py "
            "and update the patch, or set engine.launch.fast_waits=false"
        )
    src = inspect.getsource(sci)
    problems = []
    if sci.time is not _time and not isinstance(sci.time, _ScaledTime):
        problems.append("start_client_internal.time is not the time module")
    if src.count(f"time.sleep({IDLE_SLEEP})") != 1 or src.count(f"time.sleep({REPLY_SLEEP})") != 2:
        problems.append("the sleep(3)/sleep(0.5) calls moved")
    if (
        "pull_objects(" not in src
        or "initial_backoff" not in inspect.signature(pull_objects).parameters
    ):
        problems.append("pull_objects/initial_backoff changed")
    for mod in (hb, fhc):
        if not isinstance(getattr(mod, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
            problems.append(f"{mod.__name__}.HEARTBEAT_DEFAULT_INTERVAL is gone")
    if problems:
        raise PatchError(
            "Flower internals changed: "
            + "; ".join(problems)
            + ". Fix: update cnfgnn/deploy/fastwaits.py or set "
            "engine.launch.fast_waits=false"
        )


def patch_supernode(waits: Waits) -> dict[str, float]:
    """Apply ``waits`` to this process's SuperNode modules; returns what was changed.

    On a Flower version the patch was not checked against, nothing is changed: a
    ``RuntimeWarning`` says so and ``{}`` is returned.
    """
    version = flower_version()
    if version != FLOWER_VERSION:
        warnings.warn(
            f"flwr {version} installed; cnfgnn/deploy/fastwaits.py was checked against "
            f"{FLOWER_VERSION} only, so Flower's fixed waits are left as they are "
            "(rounds take longer; results are the same)",
            RuntimeWarning,
            stacklevel=2,
        )
        return {}
    check_targets()
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fhc
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    changed: dict[str, float] = {}
    mapping = {}
    if waits.idle_poll_s is not None:
        mapping[IDLE_SLEEP] = float(waits.idle_poll_s)
        changed["idle_poll_s"] = float(waits.idle_poll_s)
    if waits.reply_poll_s is not None:
        mapping[REPLY_SLEEP] = float(waits.reply_poll_s)
        changed["reply_poll_s"] = float(waits.reply_poll_s)
    if waits.hot_poll_s is not None:
        changed["hot_poll_s"] = float(waits.hot_poll_s)
        changed["hot_s"] = float(waits.hot_s)
    if mapping or waits.hot_poll_s is not None:
        sci.time = _ScaledTime(mapping, waits.hot_poll_s, float(waits.hot_s))
    if waits.object_backoff_s is not None:
        sci.pull_objects = functools.partial(
            pull_objects, initial_backoff=float(waits.object_backoff_s)
        )
        changed["object_backoff_s"] = float(waits.object_backoff_s)
    if waits.heartbeat_s is not None:
        hb.HEARTBEAT_DEFAULT_INTERVAL = float(waits.heartbeat_s)
        fhc.HEARTBEAT_DEFAULT_INTERVAL = float(waits.heartbeat_s)
        changed["heartbeat_s"] = float(waits.heartbeat_s)
    return changed
