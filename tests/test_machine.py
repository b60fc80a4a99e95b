"""cnfgnn.machine: the CPU-steal reading that benchmarks report next to the load average."""

from __future__ import annotations

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
