"""Fit a run to the machine: torch threads and the progress display (``conf/config.yaml``).

``threads: null`` (the default) uses every core this process may run on; an integer pins
torch's intra-op threads (tests and benchmarks pin 1 or 2). ``device: auto`` (the default)
picks CUDA when present: :func:`cnfgnn.device.resolve_device`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def cores() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_ticks() -> tuple[int, int] | None:
    """``(steal, total)`` clock ticks of all CPUs since boot (Linux ``/proc/stat``), or None.

    Steal is time the hypervisor gave this virtual machine's CPUs to others: a machine with
    a low load average can still lose a fifth of its cycles, so benchmarks report it.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    steal = fields[7] if len(fields) > 7 else 0
    return steal, sum(fields[:8])


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of CPU time stolen between two :func:`cpu_ticks` readings (None if unknown)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def settle_load(
    max_load: float,
    timeout_s: float,
    poll_s: float = 5.0,
    load: Callable[[], tuple[float, float, float]] = os.getloadavg,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Wait until the 1-minute load average is at most ``max_load`` or ``timeout_s`` has
    passed; returns the seconds waited. A timing started right after another heavy job
    would otherwise share the CPUs with that job's tail (the load average lags by about a
    minute). The caller records the load it then starts at, whether or not it settled."""
    start = clock()
    while load()[0] > max_load and clock() - start < timeout_s:
        sleep(max(0.0, min(poll_s, timeout_s - (clock() - start))))
    return clock() - start


def set_threads(threads: Any) -> int:
    """``torch.set_num_threads``: ``threads`` (>= 1) or, for ``None``, every core; returns it."""
    import torch

    n = cores() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads={threads!r}: use a positive number, or null for all cores")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def apply(cfg: Any) -> None:
    """Threads and progress display of a composed config (``threads``, ``progress``)."""
    from cnfgnn import progress

    n = set_threads(cfg.get("threads"))
    progress.configure(cfg.get("progress", "auto"))
    log.debug("torch threads: %d (threads=%s), device=%s", n, cfg.get("threads"), cfg.get("device"))
