"""SensorData: features, time of day, edge_index order, subsets, shape checks."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.utils import dense_to_sparse

from cnfgnn.data.dataset import SensorData
from cnfgnn.data.errors import DataError


def _data(t=6, n=3):
    rng = np.random.default_rng(0)
    adj = np.array([[1, 0.5, 0], [0, 1, 0.2], [0.7, 0, 1]], np.float32)[:n, :n]
    return SensorData(
        "toy",
        rng.uniform(0, 70, (t, n)),
        np.ones((t, n), bool),
        pd.date_range("2020-01-01 23:50", periods=t, freq="5min"),
        5,
        ["a", "b", "c"][:n],
        adj,
        np.array([[34, -118], [34.1, -118.2], [34.2, -118.1]])[:n],
    )


def test_time_of_day_and_features():
    d = _data()
    np.testing.assert_allclose(
        d.time_of_day()[:4], [1430 / 1440, 1435 / 1440, 0.0, 5 / 1440], atol=1e-7
    )
    f = d.features()
    assert f.shape == (6, 3, 2) and f.dtype == np.float32
    np.testing.assert_array_equal(f[..., 0], d.speed)
    np.testing.assert_array_equal(f[:, 1, 1], d.time_of_day())
    assert d.num_nodes == 3 and d.num_steps == 6


def test_edge_index_matches_pyg_dense_to_sparse():
    d = _data()
    ei, w = d.edge_index()
    pei, pw = dense_to_sparse(torch.from_numpy(d.adjacency))
    assert ei.dtype == np.int64 and w.dtype == np.float32 and ei.shape == (2, 6)
    np.testing.assert_array_equal(ei, pei.numpy())
    np.testing.assert_array_equal(w, pw.numpy())


def test_subset_is_the_induced_subnetwork():
    d = _data()
    s = d.subset(np.array([2, 0]))
    assert s.sensor_ids == ["c", "a"]
    np.testing.assert_array_equal(s.speed, d.speed[:, [2, 0]])
    np.testing.assert_allclose(s.adjacency, [[1, 0.7], [0, 1]])
    np.testing.assert_array_equal(s.locations, d.locations[[2, 0]])
    with pytest.raises(DataError):
        d.subset(np.array([3]))


def test_inconsistent_shapes_are_rejected():
    d = _data()
    with pytest.raises(DataError, match="toy.*sensor ids"):
        SensorData("toy", d.speed, d.mask, d.timestamps, 5, ["a"], d.adjacency)
    with pytest.raises(DataError, match="adjacency shape"):
        SensorData("toy", d.speed, d.mask, d.timestamps, 5, d.sensor_ids, np.eye(2))
