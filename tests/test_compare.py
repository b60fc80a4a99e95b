"""cnfgnn-compare and cnfgnn-report: one budget for every method, tables equal the runs'
own final metrics, failures do not stop the others, plots are written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from cnfgnn import compare, report
from cnfgnn.shell import UsageError
from tests.conftest import TINY

REQUIRED = ["method", "rmse", "mae_h3", "mae_h6", "mae_h12", "bytes", "seconds"]


def _plan(*args: str) -> dict[str, list[str]]:
    conf, runs = compare.compare_config(list(args))
    return compare.plan(conf, runs)


def _value(overrides: list[str], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


def test_every_method_gets_the_same_budget_of_local_epochs():
    plans = _plan("compare.run=all", "compare.budget_epochs=10", "dataset.num_nodes=6")
    assert set(plans) == {"cnfgnn", "gru_local", "gru_fedavg", "gru_central", "gru_gn_central",
                          "gru_fmtl", "split_learning", "at_no_fedavg"}
    for name, overrides in plans.items():
        cfg = compare.compose_run(overrides)
        assert cfg.federation.rounds * cfg.federation.local_epochs == 10, name
        assert cfg.dataset.num_nodes == 6  # the user's overrides reach every run
    assert _value(plans["gru_local"], "federation.rounds") == "2"  # 5 epochs a round, as the paper
    # a budget the preset's R_c does not divide: R_c shrinks, the budget stays exact
    local = compare.compose_run(_plan("compare.run=[gru_local]", "compare.budget_epochs=3")["gru_local"])
    assert (local.federation.rounds, local.federation.local_epochs) == (1, 3)


def test_bad_settings_are_refused_before_anything_runs():
    with pytest.raises(UsageError, match="unknown method"):
        _plan("compare.run=[cnfgnn,gru_magic]")
    with pytest.raises(UsageError, match="unknown setting"):
        _plan("compare.budget=3")
    with pytest.raises(UsageError, match="do not compose"):
        _plan("compare.run=[cnfgnn]", "dataset=no_such_dataset")
    with pytest.raises(UsageError, match="at least 1"):
        _plan("compare.budget_epochs=0")


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """A tiny comparison (CNFGNN, GRU local, GRU central; 2 local epochs each)."""
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    code = compare.main([*TINY, "compare.run=[cnfgnn,gru_local,gru_central]",
                         "compare.budget_epochs=2", f"compare.out={out}", f"output_root={out}"])
    assert code == 0
    return out


def test_comparison_table_holds_each_runs_own_test_metrics(compared):
    rows = list(csv.DictReader(open(compared / "comparison.csv")))
    assert [r["method"] for r in rows] == ["cnfgnn", "gru_local", "gru_central"]
    assert set(REQUIRED) <= set(rows[0])
    for r in rows:
        final = json.loads((compared / r["method"] / "final.json").read_text())
        assert float(r["rmse"]) == pytest.approx(final["test"]["rmse"])
        assert float(r["mae_h3"]) == pytest.approx(final["test"]["masked_mae_h3"])
        assert float(r["mae_h12"]) == pytest.approx(final["test"]["masked_mae_h12"])
        assert int(r["bytes"]) == final["bytes_total"]
        assert int(r["local_epochs"]) == 2  # the same budget for all
        assert float(r["peak_rss_mb"]) > 50  # measured per method process
    by = {r["method"]: r for r in rows}
    assert int(by["gru_local"]["params_server"]) == 0 < int(by["cnfgnn"]["params_server"])
    assert "CNFGNN" in (compared / "comparison.md").read_text()
    for name in ("forecasts", "horizons", "sensor_maps", "validation", "bytes"):
        img = mpimg.imread(compared / "plots" / f"{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 400, name


def test_a_finished_method_is_kept_and_a_failing_one_does_not_stop_the_others(compared, capsys):
    before = (compared / "cnfgnn" / "final.json").read_text()
    (compared / "gru_local" / "final.json").unlink()  # as if it had been interrupted
    # GRU local cannot run inductively (no model for unseen nodes): it fails, FedAvg still runs
    code = compare.main([*TINY, "compare.run=[cnfgnn,gru_local,gru_fedavg]", "compare.budget_epochs=2",
                         f"compare.out={compared}", "compare.force=false",
                         "federation.inductive_ratio=0.5", f"output_root={compared}"])
    out = capsys.readouterr().out
    assert code == 1
    assert "cnfgnn: done before" in out and "gru_local FAILED" in out
    assert (compared / "cnfgnn" / "final.json").read_text() == before  # not rerun
    assert (compared / "gru_fedavg" / "final.json").exists()
    assert list(compared.glob("gru_local.prev-*"))  # the earlier gru_local run was kept aside
    manifest = json.loads((compared / "compare.json").read_text())
    assert manifest["methods"]["gru_local"]["returncode"] != 0


def test_report_over_any_runs_and_the_reference_numbers(compared, tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("cnfgnn", "gru_central"):  # runs outside a compare directory
        shutil.copytree(compared / name, sweep / "0" / name)
    assert report.main([str(sweep), f"out={tmp_path / 'rep'}"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rep" / "comparison.csv")))
    labels = sorted(r["label"] for r in rows)
    assert labels[0] == "CNFGNN" and labels[1].startswith("GRU (centralized, ")
    run = report.load_run(sweep / "0" / "cnfgnn")
    assert report.row(run)["reference_rmse"] is None  # no reported number for synthetic data
    run.cfg.dataset.name = "los-loop"  # as conf/dataset/los_loop.yaml names it
    assert report.row(run)["reference_rmse"] == 7.99
    with pytest.raises(UsageError, match="no finished run"):
        report.find_runs([tmp_path / "rep" / "plots"])
