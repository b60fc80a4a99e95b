"""Loaders on the real files in ../shared/data (skipped when absent)."""

import numpy as np
import pytest

from cnfgnn.data.csvio import read_distances_csv
from cnfgnn.data.dcrnn import load_adj_pkl
from cnfgnn.data.graph import distance_matrix, gaussian_kernel_adjacency
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.tabular import load_los_loop, load_metrla_json
from tests.data._helpers import REPO, SHARED_DATA


@pytest.fixture(scope="module")
def shared():
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


def test_metr_la_adj_pkl(shared):
    ids, id_to_index, adj = load_adj_pkl(shared / "METR-LA" / "adj_mx.pkl")
    assert len(ids) == 207 and adj.shape == (207, 207) and adj.dtype == np.float32
    assert int((adj > 0).sum()) == 1722
    assert ids[:2] == ["773869", "767541"] and id_to_index["773869"] == 0
    np.testing.assert_array_equal(np.diag(adj), 1.0)
    txt = (shared / "METR-LA" / "graph_sensor_ids.txt").read_text().strip().split(",")
    assert ids == txt


def test_los_loop(shared):
    d = load_los_loop(shared / "Los-loop" / "los_speed.csv", shared / "Los-loop" / "los_adj.csv",
                      locations_path=shared / "METR-LA" / "graph_sensor_locations.csv")
    assert d.speed.shape == (2016, 207) and d.mask.all()
    assert str(d.timestamps[0]) == "2012-03-01 00:00:00"
    assert str(d.timestamps[-1]) == "2012-03-07 23:55:00"
    assert int((d.adjacency > 0).sum()) == 2833
    _, _, adj = load_adj_pkl(shared / "METR-LA" / "adj_mx.pkl")
    np.testing.assert_allclose(d.adjacency, np.maximum(adj, adj.T), atol=1e-6)
    assert d.locations.shape == (207, 2) and d.locations[0].tolist() == [34.15497, -118.31829]


def test_metrla_json_zeros_become_masked(shared):
    j = load_metrla_json(shared / "METR-LA" / "METRLA.json")
    assert j.speed.shape == (100, 207)
    assert j.sensor_ids[0] == "773869"  # from graph_sensor_ids.txt next to it
    zeros = ~j.mask
    assert 0.03 < zeros.mean() < 0.032 and np.all(j.speed[zeros] == 0)
    np.testing.assert_allclose(j.time_of_day(), np.arange(100) / 288, atol=1e-6)
    _, _, adj = load_adj_pkl(shared / "METR-LA" / "adj_mx.pkl")
    np.testing.assert_allclose(j.adjacency, adj, atol=1e-6)
    los = load_los_loop(shared / "Los-loop" / "los_speed.csv", shared / "Los-loop" / "los_adj.csv")
    np.testing.assert_array_equal(j.speed[j.mask], los.speed[:100][j.mask])
    np.testing.assert_allclose(j.speed[0, :3], [64.375, 67.625, 67.125])


def test_pems_bay_distances_reproduce_adj_mx_bay(shared):
    ids, _, adj = load_adj_pkl(shared / "PEMS-BAY" / "adj_mx_bay.pkl")
    src, dst, dist = read_distances_csv(shared / "PEMS-BAY" / "distances_bay_2017.csv")
    ours = gaussian_kernel_adjacency(distance_matrix(src, dst, dist, ids, "distances"))
    assert int((ours > 0).sum()) == int((adj > 0).sum()) == 2694
    np.testing.assert_allclose(ours, adj, atol=1e-6)


def test_configs_load_the_shared_files(shared, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name ../shared/data relative to the repo
    from tests.helpers import make_cfg

    d = load_dataset(make_cfg("dataset=los_loop").dataset)
    assert d.name == "los-loop" and d.locations is not None
    j = load_dataset(make_cfg("dataset=metr_la_json").dataset)
    assert j.num_steps == 100 and j.locations.shape == (207, 2)
