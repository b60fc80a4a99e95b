"""Loaders on the real files bundled in data/ (gzip; provenance in data/README.md)."""

import gzip
import hashlib
import re

import numpy as np
import pytest

from cnfgnn.data.csvio import load_locations, read_distances_csv
from cnfgnn.data.dcrnn import load_adj_pkl
from cnfgnn.data.errors import DataError
from cnfgnn.data.graph import distance_matrix, gaussian_kernel_adjacency
from cnfgnn.data.gz import read_text
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.tabular import load_los_loop, load_metrla_json
from cnfgnn.paths import data_dir, data_file
from tests.data._helpers import BUNDLED_DATA as D
from tests.data._helpers import adjacency, write_pkl
from tests.helpers import make_cfg

LOS = D / "los_loop"
MLA = D / "metr_la"
BAY = D / "pems_bay"


def test_bundled_files_match_the_sha256_in_data_readme():
    """Each shipped file decompresses to the original whose SHA-256 data/README.md states."""
    rows = re.findall(
        r"^\| `([\w/.-]+\.gz)` \|.*\| ([0-9a-f]{64}) \|",
        (D / "README.md").read_text(),
        flags=re.MULTILINE,
    )
    shipped = sorted(str(p.relative_to(D)) for p in D.glob("*/*.gz"))
    assert sorted(r[0] for r in rows) == shipped and len(shipped) == 9
    for rel, sha in rows:
        assert hashlib.sha256(gzip.decompress((D / rel).read_bytes())).hexdigest() == sha, rel


def test_package_finds_the_bundled_files():
    assert data_dir().resolve() == D.resolve()
    assert data_file("los_loop/los_speed.csv.gz") == str(data_dir() / "los_loop/los_speed.csv.gz")
    missing = data_file("los_loop/nope.csv")  # resolvable; opening it names the file
    with pytest.raises(DataError, match="nope.csv: Los-loop speed CSV not found"):
        load_los_loop(missing, graph="los_adj")


def test_metr_la_adj_pkl():
    ids, id_to_index, adj = load_adj_pkl(MLA / "adj_mx.pkl.gz")
    assert len(ids) == 207 and adj.shape == (207, 207) and adj.dtype == np.float32
    assert int((adj > 0).sum()) == 1722
    assert ids[:2] == ["773869", "767541"] and id_to_index["773869"] == 0
    np.testing.assert_array_equal(np.diag(adj), 1.0)
    txt = read_text(MLA / "graph_sensor_ids.txt.gz").strip().split(",")
    assert ids == txt


def test_los_loop():
    d = load_los_loop(
        LOS / "los_speed.csv.gz",
        LOS / "los_adj.csv.gz",
        locations_path=MLA / "graph_sensor_locations.csv.gz",
    )
    assert d.speed.shape == (2016, 207) and d.mask.all()
    assert str(d.timestamps[0]) == "2012-03-01 00:00:00"
    assert str(d.timestamps[-1]) == "2012-03-07 23:55:00"
    assert int((d.adjacency > 0).sum()) == 2833
    _, _, adj = load_adj_pkl(MLA / "adj_mx.pkl.gz")
    np.testing.assert_allclose(d.adjacency, np.maximum(adj, adj.T), atol=1e-6)
    assert d.locations.shape == (207, 2) and d.locations[0].tolist() == [34.15497, -118.31829]


@pytest.mark.parametrize("graph,nnz,symmetric", [("metr_la", 1722, False), ("los_adj", 2833, True)])
def test_los_loop_graph_choice(graph, nnz, symmetric):
    """``dataset.graph`` picks the directed DCRNN graph (default) or T-GCN's symmetric one;
    either way rows and columns follow the speed CSV's sensor order."""
    cfg = make_cfg("dataset=los_loop", *([] if graph == "metr_la" else [f"dataset.graph={graph}"]))
    assert cfg.dataset.graph == graph
    d = load_dataset(cfg.dataset)
    assert int((d.adjacency > 0).sum()) == nnz
    assert np.array_equal(d.adjacency, d.adjacency.T) == symmetric
    pkl_ids, _, adj = load_adj_pkl(MLA / "adj_mx.pkl.gz")
    header = read_text(LOS / "los_speed.csv.gz").split("\n", 1)[0].split(",")
    assert d.sensor_ids == header == pkl_ids  # the same 207 detectors in the same order
    expected = adj if graph == "metr_la" else np.maximum(adj, adj.T)
    np.testing.assert_allclose(d.adjacency, expected, atol=1e-6)


def test_los_loop_graph_errors(tmp_path):
    with pytest.raises(DataError, match="unknown graph 'ring'.*dataset.graph"):
        load_los_loop(LOS / "los_speed.csv.gz", graph="ring")
    with pytest.raises(DataError, match="dataset.adj_pkl"):
        load_los_loop(LOS / "los_speed.csv.gz", graph="metr_la")
    other = tmp_path / "adj.pkl"  # a pickle of other sensors is named, with the fix
    write_pkl(other, ["1", "2", "3", "4"], adjacency())
    with pytest.raises(DataError, match="adj.pkl.*do not match"):
        load_los_loop(LOS / "los_speed.csv.gz", graph="metr_la", adj_pkl_path=other)


def test_metrla_json_zeros_become_masked():
    j = load_metrla_json(MLA / "METRLA.json.gz")
    assert j.speed.shape == (100, 207)
    assert j.sensor_ids[0] == "773869"  # from graph_sensor_ids.txt.gz next to it
    zeros = ~j.mask
    assert 0.03 < zeros.mean() < 0.032 and np.all(j.speed[zeros] == 0)
    np.testing.assert_allclose(j.time_of_day(), np.arange(100) / 288, atol=1e-6)
    _, _, adj = load_adj_pkl(MLA / "adj_mx.pkl.gz")
    np.testing.assert_allclose(j.adjacency, adj, atol=1e-6)
    los = load_los_loop(LOS / "los_speed.csv.gz", LOS / "los_adj.csv.gz")
    np.testing.assert_array_equal(j.speed[j.mask], los.speed[:100][j.mask])
    np.testing.assert_allclose(j.speed[0, :3], [64.375, 67.625, 67.125])


def test_pems_bay_distances_reproduce_adj_mx_bay():
    ids, _, adj = load_adj_pkl(BAY / "adj_mx_bay.pkl.gz")
    src, dst, dist = read_distances_csv(BAY / "distances_bay_2017.csv.gz")
    ours = gaussian_kernel_adjacency(distance_matrix(src, dst, dist, ids, "distances"))
    assert int((ours > 0).sum()) == int((adj > 0).sum()) == 2694
    np.testing.assert_allclose(ours, adj, atol=1e-6)


def test_configs_load_the_bundled_files(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # found through the package, from any working directory
    d = load_dataset(make_cfg("dataset=los_loop").dataset)
    assert d.name == "los-loop" and d.locations is not None
    j = load_dataset(make_cfg("dataset=metr_la_json").dataset)
    assert j.num_steps == 100 and j.locations.shape == (207, 2)
    for name, n in (("metr_la", 207), ("pems_bay", 325)):  # graph + locations of the h5 configs
        ds = make_cfg(f"dataset={name}").dataset
        ids, _, _ = load_adj_pkl(ds.adj_pkl)
        assert len(ids) == n
        assert load_locations(ds.locations, ids).shape == (n, 2)
