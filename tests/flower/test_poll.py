"""``engine.poll_busy_share``: the ServerApp's pulls for replies take a bounded share of the
wait, however many replies are pending (a pull's cost grows with them)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cnfgnn.config import compose
from cnfgnn.flower.engine import FlowerEngine


class SlowGrid:
    """A grid whose pulls take ``pull_s`` and never bring a reply."""

    def __init__(self, pull_s: float):
        self.pull_s = pull_s
        self.pulls = 0

    def push_messages(self, messages: list[Any]) -> list[str]:
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids: list[str]) -> list[Any]:
        self.pulls += 1
        time.sleep(self.pull_s)
        return []


def test_poll_wait_bounds_the_pulls_share() -> None:
    eng = FlowerEngine(SlowGrid(0.0), poll_interval_s=0.02, poll_busy_share=0.05)
    assert eng._poll_wait(0.001) == pytest.approx(0.02)  # cheap pulls: the interval
    assert eng._poll_wait(0.004) == pytest.approx(0.076)  # 4 ms of every 80 ms
    off = FlowerEngine(SlowGrid(0.0), poll_interval_s=0.02)
    assert off._poll_wait(0.004) == pytest.approx(0.02)


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_a_share_outside_0_1_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="poll_busy_share"):
        FlowerEngine(SlowGrid(0.0), poll_busy_share=share)


def test_slow_pulls_are_spaced_out() -> None:
    """1 s of waiting for replies that never come, pulls of 20 ms: every 1 ms without a
    share (about 47 pulls), at most a share of 0.1 with it (about 6)."""
    counts = {}
    for share in (None, 0.1):
        grid = SlowGrid(0.02)
        eng = FlowerEngine(grid, timeout_s=1.0, poll_interval_s=0.001, poll_busy_share=share)
        out = eng._round_trip({0: object(), 1: object()})
        assert sorted(out) == [0, 1]  # both left out: no reply within the timeout
        counts[share] = grid.pulls
    assert counts[None] >= 20
    assert counts[0.1] <= 7


def test_simulation_config_bounds_the_pulls_and_deployment_does_not() -> None:
    sim = FlowerEngine.from_config(SlowGrid(0.0), compose(["engine=simulation"]).engine, None)
    dep = FlowerEngine.from_config(SlowGrid(0.0), compose(["engine=deployment"]).engine, None)
    assert sim.poll_busy_share == pytest.approx(0.05)
    assert dep.poll_busy_share is None
