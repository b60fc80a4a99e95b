"""Shared by the deployment tests: no process that refers to a test's directory may outlive it."""

from __future__ import annotations

import pytest

from tests.helpers import processes_of


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    yield
    left = processes_of(tmp_path)
    assert left == [], f"processes of this test still running: {left}"
