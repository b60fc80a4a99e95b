"""Shared by the deployment tests: no process that refers to a test's directory may outlive it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launch.procs import cmdline_of


def processes_of(path: Path) -> list[int]:
    """Pids whose command line names ``path`` (the processes a test started under it)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and str(path) in cmdline_of(int(p))]


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    yield
    left = processes_of(tmp_path)
    assert left == [], f"processes of this test still running: {left}"
