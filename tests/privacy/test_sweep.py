"""The accuracy-against-noise sweep's rows, seed means and outputs (cnfgnn/privacy/sweep.py)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from cnfgnn.privacy import sweep


def _final(rmse: float, eps: float | None) -> dict:
    priv = None
    if eps is not None:
        priv = {
            "epsilon": eps,
            "delta": 1e-6,
            "mechanisms": {m: {"clip": 1.0, "noise_multiplier": 1.0} for m in sweep.MECHANISMS},
            "releases_per_window": {"h_c": 2, "grad": 2, "fedavg": 2},
            "epsilon_with_secagg": eps / 4,
            "fedavg": {"noise_at": "node"},
        }
    return {"test": {"rmse": rmse, "mae": rmse / 2}, "rounds_run": 2, "privacy": priv}


def _rows(tmp_path, table: dict[tuple[str, int], tuple[float, float | None, int]]) -> list[dict]:
    rows = []
    for (level, seed), (rmse, eps, rc) in table.items():
        d = tmp_path / f"noise_{level}" / f"seed_{seed}"
        d.mkdir(parents=True)
        if rc == 0:
            (d / "final.json").write_text(json.dumps(_final(rmse, eps)))
        rows.append(sweep._row(level, seed, d, rc, 10.0 + seed))
    return rows


def test_level_overrides_set_every_mechanism():
    assert sweep.level_overrides("none") == ["privacy=none"]
    over = sweep.level_overrides("0.5")
    assert over[0] == "privacy=dp"
    assert {f"privacy.{m}.noise_multiplier=0.5" for m in sweep.MECHANISMS} <= set(over)


def test_mean_rows_over_seeds_skip_failed_runs(tmp_path):
    rows = _rows(
        tmp_path,
        {
            ("none", 1): (10.0, None, 0),
            ("none", 2): (12.0, None, 0),
            ("1", 1): (13.0, 5.0, 0),
            ("1", 2): (15.0, 5.0 + 1e-14, 0),  # the accountant's float noise
            ("1", 3): (0.0, None, 1),  # failed: no final.json
        },
    )
    means = {m["noise_multiplier"]: m for m in sweep.mean_rows(rows)}
    assert means["none"]["test_rmse"] == pytest.approx(11.0)
    assert means["none"]["test_rmse_std"] == pytest.approx(math.sqrt(2.0))
    assert means["none"]["epsilon"] == "no DP" and means["none"]["epsilon_std"] is None
    assert means["1"]["seeds"] == 2  # the failed seed is not averaged
    assert means["1"]["test_rmse"] == pytest.approx(14.0)
    assert means["1"]["epsilon"] == 5.0 and means["1"]["epsilon_std"] is None  # no "± 0"


def test_outputs_keep_seed_rows_and_show_mean_pm_std(tmp_path):
    rows = _rows(
        tmp_path,
        {("none", 1): (10.0, None, 0), ("none", 2): (12.0, None, 0), ("2", 1): (20.0, 3.0, 0)},
    )
    sweep.write_outputs(rows, tmp_path, "t")
    with open(tmp_path / "privacy_sweep.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["seed"] for r in got] == ["1", "2", "1", "", ""]  # per seed, then the means
    assert float(got[3]["test_rmse"]) == pytest.approx(11.0)
    md = (tmp_path / "privacy_sweep.md").read_text()
    assert "11 ± 1.414" in md
    assert (tmp_path / "privacy_sweep.png").stat().st_size > 0


def test_without_seeds_the_table_is_per_run(tmp_path):
    d = tmp_path / "noise_1"
    d.mkdir()
    (d / "final.json").write_text(json.dumps(_final(9.0, 4.0)))
    rows = [sweep._row("1", None, d, 0, 1.0)]
    sweep.write_outputs(rows, tmp_path, "t")
    with open(tmp_path / "privacy_sweep.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 1 and got[0]["seed"] == ""
    assert "| 1 | 4 | 1 | 1e-06 | 9 |" in (tmp_path / "privacy_sweep.md").read_text()


def test_an_epsilon_that_differs_between_seeds_gets_a_spread(tmp_path):
    rows = _rows(tmp_path, {("1", 1): (13.0, 5.0, 0), ("1", 2): (15.0, 7.0, 0)})  # e.g. dropouts
    (m,) = sweep.mean_rows(rows)
    assert m["epsilon"] == pytest.approx(6.0) and m["epsilon_std"] == pytest.approx(math.sqrt(2))


def test_the_command_runs_every_level_and_seed_to_the_end(tmp_path, capsys):
    """``python -m cnfgnn.privacy.sweep`` as a user runs it: child processes, then the files."""
    from tests.helpers import TINY

    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--levels", "none,1", "--seeds", "42,43", "--parallel", "2"]
    code = sweep.main([*argv, "--", *TINY, "federation.rounds=1", "federation.scaling=per_node"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "privacy_sweep.csv")))
    per_seed = [(r["noise_multiplier"], r["seed"]) for r in rows if r["seed"]]
    assert sorted(per_seed) == [("1", "42"), ("1", "43"), ("none", "42"), ("none", "43")]
    means = {r["noise_multiplier"]: r for r in rows if not r["seed"]}
    assert set(means) == {"none", "1"}
    assert means["none"]["epsilon"] == means["none"]["epsilon_secagg"] == "no DP"
    assert 0 < float(means["1"]["epsilon_secagg"]) < float(means["1"]["epsilon"]) < math.inf
    for level, seed in per_seed:
        assert (out / f"noise_{level}" / f"seed_{seed}" / "final.json").is_file()
    table = (out / "privacy_sweep.md").read_text()
    assert " ± " in table and table in capsys.readouterr().out
    assert (out / "privacy_sweep.png").stat().st_size > 0


def test_collect_rebuilds_the_outputs_from_the_runs_on_disk(tmp_path, capsys):
    rows = _rows(tmp_path, {("none", 42): (9.5, None, 0), ("1", 42): (11.0, 200.0, 0)})
    rows += _rows(tmp_path, {("1", 43): (11.4, 200.0, 0), ("0.5", 42): (0.0, None, 1)})
    (tmp_path / "noise_backup" / "seed_x").mkdir(parents=True)  # not a sweep's: skipped
    assert sweep.main(["--out", str(tmp_path), "--collect"]) == 1  # a run without final.json
    got = list(csv.DictReader(open(tmp_path / "privacy_sweep.csv")))
    assert [(r["noise_multiplier"], r["seed"]) for r in got if r["seed"]] == [
        ("none", "42"),
        ("0.5", "42"),
        ("1", "42"),
        ("1", "43"),
    ]
    one = next(r for r in got if r["noise_multiplier"] == "1" and not r["seed"])
    assert float(one["test_rmse"]) == pytest.approx(11.2)
    assert float(one["epsilon"]) == 200.0 and float(one["epsilon_secagg"]) == 50.0
    assert one["epsilon_std"] == "" and one["epsilon_secagg_std"] == ""  # equal over seeds
    assert "1 run(s) failed" in (tmp_path / "privacy_sweep.md").read_text()
    assert sweep.main(["--out", str(tmp_path / "empty"), "--collect"]) == 2
    assert "no run under" in capsys.readouterr().err
