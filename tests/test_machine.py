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
