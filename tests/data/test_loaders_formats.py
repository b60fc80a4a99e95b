"""Every loader on small files written by the test, including load_dataset dispatch."""

import json

import numpy as np
import pandas as pd
import pytest

from cnfgnn.data.dcrnn import load_adj_pkl, load_dcrnn_h5, load_dcrnn_npz
from cnfgnn.data.graph import haversine_km
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.tabular import load_csv, load_los_loop, load_metrla_json
from cnfgnn.data.windows import gather_windows, split_starts
from tests.data._helpers import IDS, adjacency, series, write_npz_splits, write_pkl, write_wide_csv

WINDOW = {"in_steps": 12, "out_steps": 12, "split": {"train": 0.7, "val": 0.1, "test": 0.2}}


def test_adj_pkl_round_trip(tmp_path):
    p = write_pkl(tmp_path / "adj.pkl", IDS, adjacency())
    ids, idx, adj = load_adj_pkl(p)
    assert ids == IDS and idx == {s: i for i, s in enumerate(IDS)}
    np.testing.assert_array_equal(adj, adjacency())


def test_dcrnn_h5_reorders_columns_to_the_pkl(tmp_path):
    df = series()
    df[IDS[::-1]].to_hdf(tmp_path / "speed.h5", key="df")  # columns in another order
    write_pkl(tmp_path / "adj.pkl", IDS, adjacency())
    d = load_dcrnn_h5(tmp_path / "speed.h5", tmp_path / "adj.pkl", name="toy")
    assert d.sensor_ids == IDS and d.interval_minutes == 5.0
    np.testing.assert_allclose(d.speed, df.to_numpy(), rtol=1e-6)
    assert not d.mask[3, 1] and not d.mask[10, 2] and d.mask.sum() == d.speed.size - 2
    cfg = {
        "kind": "dcrnn_h5",
        "name": "toy",
        "h5": str(tmp_path / "speed.h5"),
        "adj_pkl": str(tmp_path / "adj.pkl"),
        "key": None,
        **WINDOW,
    }
    np.testing.assert_array_equal(load_dataset(cfg).speed, d.speed)


def test_dcrnn_npz_rebuilds_the_series(tmp_path):
    df = series(t=80)
    tod = ((df.index - df.index.normalize()) / pd.Timedelta(days=1)).to_numpy()
    xs = write_npz_splits(tmp_path / "npz", df.to_numpy(), tod)
    write_pkl(tmp_path / "adj.pkl", IDS, adjacency())
    d = load_dcrnn_npz(tmp_path / "npz", tmp_path / "adj.pkl", start="2020-03-01")
    np.testing.assert_allclose(d.speed, df.to_numpy(), rtol=1e-6)
    assert (d.timestamps == df.index).all() and d.interval_minutes == 5.0
    # the split of the rebuilt series gives back exactly the same windows
    feats = d.features()
    for name, st in split_starts(d.num_steps).items():
        np.testing.assert_allclose(gather_windows(feats, st, 12), xs[name], rtol=1e-6)
    assert not d.mask[3, 1]


def test_los_loop_style(tmp_path):
    df = series()
    df.to_csv(tmp_path / "speed.csv", index=False)
    np.savetxt(tmp_path / "adj.csv", adjacency(), delimiter=",")
    d = load_los_loop(tmp_path / "speed.csv", tmp_path / "adj.csv", start="2012-03-01")
    assert d.speed.shape == (60, 4) and d.sensor_ids == IDS
    assert str(d.timestamps[1]) == "2012-03-01 00:05:00"
    np.testing.assert_array_equal(d.adjacency, adjacency())


@pytest.mark.parametrize("form", ["plain", "header", "header_and_index"])
def test_csv_with_adjacency(tmp_path, form):
    df = series()
    write_wide_csv(tmp_path / "s.csv", df, blank=[(5, 0)])
    adj = adjacency()
    perm = [2, 0, 3, 1]  # a header lets the matrix come in any order
    if form == "plain":
        np.savetxt(tmp_path / "a.csv", adj, delimiter=",")
    else:
        ids = [IDS[i] for i in perm]
        pd.DataFrame(adj[np.ix_(perm, perm)], index=ids, columns=ids).to_csv(
            tmp_path / "a.csv", index=form == "header_and_index"
        )
    d = load_csv(tmp_path / "s.csv", adjacency=tmp_path / "a.csv")
    np.testing.assert_allclose(d.adjacency, adj)
    assert not d.mask[5, 0] and d.speed[5, 0] == 0 and d.mask.sum() == d.speed.size - 1
    assert d.mask[3, 1] and d.speed[3, 1] == 0  # 0 is a reading unless declared missing
    d0 = load_csv(tmp_path / "s.csv", adjacency=tmp_path / "a.csv", missing_value=0)
    assert not d0.mask[3, 1]


def test_csv_with_distances_follows_dcrnn(tmp_path):
    write_wide_csv(tmp_path / "s.csv", series())
    rows = [
        ("s10", "s20", 1.0),
        ("s20", "s30", 2.0),
        ("s30", "s40", 1.5),
        ("s10", "s30", 3.0),
        ("s99", "s10", 0.5),
    ]  # unknown sensors are skipped
    pd.DataFrame(rows, columns=["from", "to", "distance"]).to_csv(tmp_path / "d.csv", index=False)
    d = load_csv(tmp_path / "s.csv", distances=tmp_path / "d.csv")
    sigma = np.std([1.0, 2.0, 1.5, 3.0])
    assert d.adjacency[0, 1] == pytest.approx(np.exp(-((1.0 / sigma) ** 2)), rel=1e-6)
    assert d.adjacency[0, 2] == 0.0  # exp(-(3/sigma)^2) < 0.1 is dropped
    assert d.adjacency[1, 0] == 0.0  # directed
    np.testing.assert_array_equal(np.diag(d.adjacency), 1.0)


def test_csv_with_locations(tmp_path):
    write_wide_csv(tmp_path / "s.csv", series())
    loc = np.array([[34.0, -118.0], [34.01, -118.0], [34.02, -118.0], [34.5, -118.0]])
    pd.DataFrame({"sensor_id": IDS[::-1], "lat": loc[::-1, 0], "lon": loc[::-1, 1]}).to_csv(
        tmp_path / "l.csv", index=False, header=False
    )
    d = load_csv(tmp_path / "s.csv", locations=tmp_path / "l.csv")
    np.testing.assert_allclose(d.locations, loc)
    km = haversine_km(loc[:, 0], loc[:, 1])
    assert km[0, 1] == pytest.approx(1.112, rel=1e-3)
    assert d.adjacency[0, 1] == d.adjacency[1, 0] > 0.9 and d.adjacency[0, 3] == 0


def test_metrla_json_format(tmp_path):
    rng = np.random.default_rng(0)
    t, n = 30, 3
    frames = {
        str(k): [
            [float(rng.uniform(40, 70)) if (k, i) != (2, 1) else 0.0, k / 288] for i in range(n)
        ]
        for k in range(t)
    }
    edges, weights = [[0, 0], [0, 1], [1, 1], [2, 2], [2, 0]], [1.0, 0.4, 1.0, 1.0, 0.3]
    (tmp_path / "M.json").write_text(
        json.dumps({"edges": edges, "weights": weights, "time_periods": t, **frames})
    )
    d = load_metrla_json(tmp_path / "M.json")
    assert d.speed.shape == (t, n) and not d.mask[2, 1] and d.mask.sum() == t * n - 1
    assert d.adjacency[0, 1] == pytest.approx(0.4) and d.adjacency[1, 0] == 0
    assert d.sensor_ids == ["0", "1", "2"]


def test_load_dataset_synthetic_and_unknown_options():
    d = load_dataset({"kind": "synthetic", "name": "syn", "num_nodes": 5, "days": 1, **WINDOW})
    assert d.name == "syn" and d.speed.shape == (288, 5)
