"""``node_chunk``: a client's node models run in groups of that many nodes give the same
run as all nodes at once (nodes never interact; FMTL's coupling term is taken whole)."""

from __future__ import annotations

import json

import pytest

from cnfgnn.experiment import run_experiment
from tests.helpers import QUIET, TINY, make_cfg

METHODS = {  # method: its overrides on top of TINY (6 nodes, one client of all of them)
    "cnfgnn": ("federation.loss_masked=true",),
    "fmtl": ("experiment=synthetic_gru_fmtl", "federation.fmtl_lambda=0.1"),
}


def _run(tmp_path, method: str, chunk: str) -> tuple[dict, list[dict]]:
    cfg = make_cfg(
        *TINY,
        *METHODS[method],
        "federation.nodes_per_client=6",
        "federation.local_epochs=1",
        f"node_chunk={chunk}",
    )
    final, writer = run_experiment(cfg, run_dir=tmp_path / f"{method}_{chunk}", **QUIET)
    rounds = [json.loads(line) for line in (writer.dir / "metrics.jsonl").read_text().splitlines()]
    return final, rounds


@pytest.mark.parametrize("method", sorted(METHODS))
def test_node_chunk_gives_the_same_run(tmp_path, method):
    whole, whole_rounds = _run(tmp_path, method, "null")
    runs, runs_rounds = _run(tmp_path, method, "4")  # 6 nodes: a run of 4, then of 2
    losses = [
        k for k in whole_rounds[-1] if k.endswith("_loss") and whole_rounds[-1][k] is not None
    ]
    assert "train_loss" in losses and "val_loss" in losses
    for a, b in zip(whole_rounds, runs_rounds, strict=True):
        for key in losses:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["round"], key)
    for key, value in whole["test"].items():
        assert runs["test"][key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
