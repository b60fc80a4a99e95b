"""Fit a run to the machine: torch threads and the progress display (``conf/config.yaml``),
and glibc's allocator (a Flower simulation's driver, ``engine.malloc``).

``threads: null`` (the default) uses every core this process may run on; an integer pins
torch's intra-op threads (tests and benchmarks pin 1 or 2). ``device: auto`` (the default)
picks CUDA when present: :func:`cnfgnn.device.resolve_device`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_malloc(settings: Any) -> bool:
    """Set glibc's allocator from ``settings`` (``engine.malloc`` of a simulation:
    ``arena_max``, ``mmap_threshold_mb``, ``trim_threshold_mb``; a missing or null key keeps
    glibc's own); returns whether it could (False off glibc).

    A tensor freed and allocated again each step is meant to come back from the heap instead
    of as fresh pages that the kernel faults in and zeroes. Threads other than the main one
    get heaps of their own that glibc trims at once: in a micro-benchmark of the GN's split
    step, another thread took 20,000 page faults per step against 10,000 in the main thread,
    and with these settings a few hundred and 2. Interleaved on and off, the GN's step in a
    simulation was 4-7% shorter. In the bench's simulation driver its threads still take
    11,000-15,000 faults per split step and several times the in-process system time, for a
    reason not found (docs/results/2026-12-05-forked-clients-first-optimizer.md). Only a
    simulation's driver sets it: the in-process engines ran no faster, and the per-sensor
    process tree's peak memory rose by 10%
    (docs/results/2026-12-05-flower-warm-up-and-state-files.md). ``arena_max`` counts only
    for threads that have not allocated yet: call this before starting them. The settings
    hold for the rest of the process (glibc cannot go back to its adaptive thresholds): a
    Python session that runs other engines after a simulation keeps them too.
    """
    if "glibc" not in (_confstr("CS_GNU_LIBC_VERSION") or ""):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    params = (
        (M_ARENA_MAX, "arena_max", 1),
        (M_MMAP_THRESHOLD, "mmap_threshold_mb", 2**20),
        (M_TRIM_THRESHOLD, "trim_threshold_mb", 2**20),
    )
    for param, key, scale in params:
        value = (settings or {}).get(key)
        if value is None:
            continue
        if int(value) < 1:
            raise ValueError(f"engine.malloc.{key}={value!r}: use a positive number, or null")
        if libc.mallopt(param, int(value) * scale) != 1:
            raise ValueError(f"engine.malloc.{key}={value!r}: glibc refused it (mallopt)")
    return True


def _confstr(name: str) -> str | None:
    """``os.confstr(name)``, or None where the platform has no such value (or no confstr)."""
    try:
        return os.confstr(name)
    except (AttributeError, ValueError, OSError):
        return None


def apply(cfg: Any) -> None:
    """Threads and progress display of a composed config (``threads``, ``progress``)."""
    from cnfgnn import progress

    n = set_threads(cfg.get("threads"))
    progress.configure(cfg.get("progress", "auto"))
    log.debug("torch threads: %d (threads=%s), device=%s", n, cfg.get("threads"), cfg.get("device"))
