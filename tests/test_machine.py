"""cnfgnn.machine: the CPU-steal reading that benchmarks report next to the load average, and
glibc's allocator settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cnfgnn import machine


def test_steal_fraction_from_two_readings():
    assert machine.steal_fraction((10, 1000), (60, 1500)) == pytest.approx(0.1)
    assert machine.steal_fraction((10, 1000), (10, 1000)) is None  # no time passed
    assert machine.steal_fraction(None, (10, 1000)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_cpu_ticks_read_proc_stat():
    first = machine.cpu_ticks()
    assert first is not None
    steal, total = first
    assert 0 <= steal <= total and total > 0
    sum(range(2_000_000))  # some CPU time passes
    later = machine.cpu_ticks()
    assert later is not None and later[1] >= total
    frac = machine.steal_fraction(first, later)
    assert frac is None or 0.0 <= frac <= 1.0


class FakeClock:
    """A clock that only moves when slept on, and a load average that falls with it."""

    def __init__(self, loads: list[float]):
        self.t, self.loads = 0.0, loads

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s

    def load(self) -> tuple[float, float, float]:
        i = min(int(self.t // 5), len(self.loads) - 1)  # a new reading every 5 s
        return self.loads[i], 0.0, 0.0


def test_settle_load_waits_until_the_load_falls():
    c = FakeClock([2.7, 2.1, 1.6, 1.2, 0.9])
    waited = machine.settle_load(1.5, 60, 5, load=c.load, clock=c.now, sleep=c.sleep)
    assert waited == 15 and c.load()[0] == 1.2


def test_settle_load_gives_up_after_its_timeout_and_never_waits_on_a_quiet_machine():
    busy = FakeClock([3.0])
    assert machine.settle_load(1.5, 12, 5, load=busy.load, clock=busy.now, sleep=busy.sleep) == 12
    quiet = FakeClock([0.3])
    assert machine.settle_load(1.5, 60, 5, load=quiet.load, clock=quiet.now, sleep=quiet.sleep) == 0


GLIBC = "glibc" in (machine._confstr("CS_GNU_LIBC_VERSION") or "")

# A thread other than the main one allocates and frees a server step's worth of tensors
# (4 x 24 MB and 3 x 8 MB live at once), 10 times after 3 untimed steps; prints the minor
# page faults per step. argv[1] == "tuned": the simulation's engine.malloc settings first.
FAULTS = """
import resource, sys, threading, torch
from cnfgnn import machine
from cnfgnn.config import compose
torch.set_num_threads(1)  # every page is touched by the thread that counts
if sys.argv[1] == "tuned":
    assert machine.tune_malloc(compose(["engine=simulation"]).engine.malloc)
out = {}
def step():
    xs = [torch.ones(n) for n in (6 * 2**20,) * 4 + (2**21,) * 3]
    del xs
def work():
    for _ in range(3):
        step()
    r0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):
        step()
    out["faults"] = (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - r0) / 10
t = threading.Thread(target=work)
t.start()
t.join()
print(out["faults"])
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_tune_malloc_keeps_a_threads_freed_tensors_mapped():
    """With a simulation's ``engine.malloc`` settings a thread's freed tensors come back from the
    heap: at most half the page faults per step of glibc's defaults (measured: none against
    hundreds)."""

    def faults(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
        )
        return float(out.stdout.split()[-1])

    plain = min(faults("plain") for _ in range(2))
    tuned = min(faults("tuned") for _ in range(2))
    assert plain >= 100, plain  # the premise: glibc's defaults fault the pages in again
    assert tuned <= plain / 2, (plain, tuned)


def test_tune_malloc_checks_its_settings():
    assert machine.tune_malloc(None) == GLIBC  # nothing to set: glibc's own values
    if GLIBC:
        with pytest.raises(ValueError, match="engine.malloc.arena_max=0: use a positive number"):
            machine.tune_malloc({"arena_max": 0})
        # a valid setting holds for the rest of its process: set it in a process of its own
        partial = (
            "from cnfgnn import machine; "
            "print(machine.tune_malloc({'arena_max': None, 'trim_threshold_mb': 512}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", partial], capture_output=True, text=True, check=True
        )
        assert out.stdout.split()[-1] == "True"
