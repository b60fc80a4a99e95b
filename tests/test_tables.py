"""cnfgnn.tables: the CSV and markdown of the sweep and bench commands."""

from __future__ import annotations

import csv

from cnfgnn import tables


def test_cells_show_mean_and_spread_only_where_a_row_has_one():
    assert tables.fmt(1 / 3) == "0.3333"
    assert tables.fmt(float("inf")) == "inf"
    assert tables.fmt(None) == "" and tables.fmt(True) == "True"
    assert tables.cell({"rmse": 9.5301, "rmse_std": 0.0551}, "rmse") == "9.53 ± 0.0551"
    assert tables.cell({"rmse": 9.5301, "rmse_std": None}, "rmse") == "9.53"
    lines = tables.markdown([{"a": 1, "b": 2.0}, {"a": 3}], ["a", "b"])
    assert lines == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 |  |"]


def test_csv_keeps_the_chosen_columns_and_leaves_missing_ones_empty(tmp_path):
    path = tables.write_csv([{"a": 1, "b": 2, "c": 3}, {"a": 4}], ["a", "b"], tmp_path / "t.csv")
    assert list(csv.DictReader(open(path))) == [{"a": "1", "b": "2"}, {"a": "4", "b": ""}]
