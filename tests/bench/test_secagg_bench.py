"""The SecAgg+ overhead benchmark's cases and its reading of final.json (cnfgnn/bench/secagg.py)."""

from __future__ import annotations

import pytest

from cnfgnn.bench import secagg
from cnfgnn.federation import protocol as P


def test_cases_spread_the_nodes_over_the_clients():
    over = secagg.run_overrides(8, 32, True)
    assert "federation.nodes_per_client=4" in over
    assert "privacy.secagg=true" in over and "engine=simulation" in over
    assert "federation.scaling=per_node" in over  # epsilon finite under DP
    assert "privacy.secagg=false" in secagg.run_overrides(32, 32, False)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        secagg.run_overrides(5, 32, True)


def test_message_types_are_the_protocols():
    from cnfgnn.flower import secagg as flower_secagg  # the bench itself never imports flwr

    assert secagg.LOCAL_TYPE == P.LOCAL_TRAIN
    assert secagg.SECAGG_TYPE == flower_secagg.SECAGG_TYPE


@pytest.mark.parametrize("on", [False, True])
def test_phase_row_reads_the_fedavg_phase_per_round(on):
    kind = "train" if on else P.LOCAL_TRAIN
    final = {
        "rounds_run": 2,
        "seconds": {"local": 6.0, "split": 100.0},
        "wire_bytes": {kind: {"down": 10, "up": 400}, "train.split": {"down": 9, "up": 9}},
        "privacy": {"fedavg": {"secagg": on}},
        "test": {"rmse": 3.0},
    }
    row = secagg.phase_row(final)
    assert row["message_type"] == kind
    assert row["fedavg_s_per_round"] == 3.0
    assert (row["fedavg_down_bytes_per_round"], row["fedavg_up_bytes_per_round"]) == (5, 200)


@pytest.mark.slow
def test_the_command_runs_both_cases_to_the_end(flower_env, capsys):
    """``python -m cnfgnn.bench.secagg`` as a user runs it: two Flower simulations as child
    processes (SecAgg+ off, on), then the table. About a minute."""
    import csv

    from tests.helpers import TINY

    out = flower_env / "secagg"
    argv = ["--out", str(out), "--clients", "2", "--num-nodes", "6"]
    over = [*TINY, "federation.rounds=1", "privacy.secagg_plus.clipping_range=16"]  # K = 3
    assert secagg.main([*argv, "--", *over]) == 0
    rows = list(csv.DictReader(open(out / "secagg_bench.csv")))
    assert [(r["clients"], r["secagg"], r["returncode"]) for r in rows] == [
        ("2", "False", "0"),
        ("2", "True", "0"),
    ]
    assert [r["message_type"] for r in rows] == [P.LOCAL_TRAIN, secagg.SECAGG_TYPE]
    off, on = (float(r["fedavg_down_bytes_per_round"]) for r in rows)
    assert on > off > 0  # SecAgg+'s four round trips carry keys, shares and masks
    table = (out / "secagg_bench.md").read_text()
    assert table.count("\n") == 4 and table in capsys.readouterr().out
