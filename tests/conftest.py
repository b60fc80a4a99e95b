"""Shared fixtures: tiny configs composed from the real conf/ tree (helpers: tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import BUNDLED_DATA, TINY, make_cfg

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def tiny_cfg(tmp_path):
    """A 6-node, 3-day synthetic CNFGNN config writing under tmp_path."""
    return make_cfg(*TINY, f"output_root={tmp_path}")


@pytest.fixture(scope="session")
def bundled_data() -> Path:
    """The repository's data/ folder (Los-loop, METR-LA and PEMS-BAY graphs, gzip)."""
    return BUNDLED_DATA


@pytest.fixture
def task_identity():
    """``Message()`` outside Flower's runtimes needs the (internal) TaskIdentity set."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 4242, 1, 1
    yield 4242
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture
def flower_env(tmp_path, monkeypatch):
    """Node state of Flower runs under tmp_path (``$CNFGNN_STATE_ROOT``); returns tmp_path."""
    monkeypatch.setenv("CNFGNN_STATE_ROOT", str(tmp_path / "state"))
    return tmp_path
