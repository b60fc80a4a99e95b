"""Shared fixtures: tiny configs composed from the real conf/ tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = ROOT / "data"  # the real datasets shipped in the package (data/README.md)

os.environ.setdefault("MPLBACKEND", "Agg")


def make_cfg(*overrides: str):
    """Compose ``conf/config.yaml`` with overrides (as the CLI would)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


TINY = (
    "dataset=synthetic",
    "dataset.num_nodes=6",
    "dataset.days=3",
    "model.hidden_size=8",
    "model.gn.mlp_hidden=16",
    "model.gn.latent_size=8",
    "federation.rounds=2",
    "federation.batch_size=64",
    "federation.server_batch_size=48",
    "federation.eval_batch_size=256",
    "threads=1",
)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A 6-node, 3-day synthetic CNFGNN config writing under tmp_path."""
    return make_cfg(*TINY, f"output_root={tmp_path}")


@pytest.fixture(scope="session")
def bundled_data() -> Path:
    """The repository's data/ folder (Los-loop, METR-LA and PEMS-BAY graphs, gzip)."""
    return BUNDLED_DATA
