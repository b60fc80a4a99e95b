"""Data errors name the user's file, not the dataset's name: every loader records where its
series came from (``SensorData.source``), and ``load_dataset`` checks the window settings
right after loading, so a series too short for them is reported with its file."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cnfgnn.data.dcrnn import load_dcrnn_h5
from cnfgnn.data.errors import DataError
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.tabular import load_csv, load_los_loop
from tests.data._helpers import IDS, adjacency, series, write_pkl, write_wide_csv

WINDOWS = {"in_steps": 12, "out_steps": 12, "split": {"train": 0.7, "val": 0.1, "test": 0.2}}


def csv_config(folder, steps: int) -> dict:
    write_wide_csv(folder / "mine.csv", series(t=steps))
    np.savetxt(folder / "adj.csv", adjacency(), delimiter=",")
    return {
        "kind": "csv",
        "name": "csv",
        "series": str(folder / "mine.csv"),
        "adjacency": str(folder / "adj.csv"),
        **WINDOWS,
    }


def test_a_too_short_series_names_its_file(tmp_path):
    cfg = csv_config(tmp_path, steps=19)
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{tmp_path / 'mine.csv'}: 19 time steps are fewer than one window of 12 + 12 steps"
        ),
    ):
        load_dataset(cfg)
    data = load_dataset(cfg, windows=False)  # data only for a forecast: no windows needed
    assert data.num_steps == 19 and data.where == str(tmp_path / "mine.csv")


def test_an_empty_split_names_its_file(tmp_path):
    cfg = csv_config(tmp_path, steps=26)  # 3 windows: val gets none
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "mine.csv")) + ".*empty val"):
        load_dataset(cfg)


def test_every_loader_records_its_file(tmp_path):
    df = series()
    write_wide_csv(tmp_path / "s.csv", df)
    np.savetxt(tmp_path / "a.csv", adjacency(), delimiter=",")
    assert load_csv(tmp_path / "s.csv", adjacency=tmp_path / "a.csv").where == str(
        tmp_path / "s.csv"
    )
    df.to_csv(tmp_path / "los.csv", index=False)
    assert load_los_loop(tmp_path / "los.csv", tmp_path / "a.csv").source == str(
        tmp_path / "los.csv"
    )
    df.to_hdf(tmp_path / "speed.h5", key="df")
    write_pkl(tmp_path / "adj.pkl", IDS, adjacency())
    h5 = load_dcrnn_h5(tmp_path / "speed.h5", tmp_path / "adj.pkl")
    assert h5.source == str(tmp_path / "speed.h5")
    assert h5.subset(np.array([1, 0])).where == str(tmp_path / "speed.h5")  # kept by subset
    syn = load_dataset({"kind": "synthetic", "name": "synthetic", "num_nodes": 3, "days": 1})
    assert syn.source == "" and syn.where == "synthetic"  # generated: its name
