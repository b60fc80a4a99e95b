"""Per-client shards: each client directory holds only its nodes; all or nothing."""

import json

import numpy as np
import pytest

from cnfgnn.data import shards
from cnfgnn.data.errors import DataError
from cnfgnn.data.shards import load_manifest, load_server_graph, load_shard, write_shards
from cnfgnn.data.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def data():
    return generate_synthetic(num_nodes=7, days=1, seed=3)


def test_write_and_load(tmp_path, data):
    out = write_shards(data, tmp_path / "sh", nodes_per_client=3)
    man = load_manifest(out)
    assert man["num_clients"] == 3 and man["num_steps"] == data.num_steps
    assert [c["nodes"] for c in man["clients"]] == [[0, 1, 2], [3, 4, 5], [6]]
    for c in man["clients"]:
        sh = load_shard(out / c["dir"])
        g = np.asarray(c["nodes"])
        np.testing.assert_array_equal(sh.node_indices, g)
        np.testing.assert_array_equal(sh.speed, data.speed[:, g])
        np.testing.assert_array_equal(sh.mask, data.mask[:, g])
        assert sh.sensor_ids == [data.sensor_ids[i] for i in g] == c["sensor_ids"]
        assert (sh.timestamps == data.timestamps).all() and sh.interval_minutes == 5.0
        np.testing.assert_array_equal(sh.time_of_day(), data.time_of_day())
    graph = load_server_graph(out)
    np.testing.assert_array_equal(graph["adjacency"], data.adjacency)
    np.testing.assert_allclose(graph["locations"], data.locations)
    with np.load(out / "server" / "graph.npz") as z:  # the server's shard holds no series
        assert set(z.files) == {"adjacency", "sensor_ids", "locations", "has_locations"}
    assert sorted(p.name for p in out.iterdir()) == [
        "client_0000",
        "client_0001",
        "client_0002",
        "manifest.json",
        "server",
    ]


def test_subset_of_nodes_in_given_order(tmp_path, data):
    out = write_shards(data, tmp_path / "sh", nodes_per_client=2, nodes=np.array([5, 1, 2]))
    man = json.loads((out / "manifest.json").read_text())
    assert [c["nodes"] for c in man["clients"]] == [[5, 1], [2]]


def test_failure_leaves_nothing(tmp_path, data, monkeypatch):
    calls = {"n": 0}
    real = np.savez

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(shards.np, "savez", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_shards(data, tmp_path / "sh", nodes_per_client=2)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path, data):
    (tmp_path / "sh").mkdir()
    (tmp_path / "sh" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="sh.*not an empty directory"):
        write_shards(data, tmp_path / "sh", nodes_per_client=2)
    assert (tmp_path / "sh" / "keep.txt").read_text() == "mine"
    with pytest.raises(DataError):
        write_shards(data, tmp_path / "other", nodes_per_client=2, nodes=np.array([0, 0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sh"]


def test_nodes_per_client_null_writes_one_shard_of_all(tmp_path, data):
    man = load_manifest(write_shards(data, tmp_path / "sh", nodes_per_client=None))
    assert man["num_clients"] == 1 and man["nodes_per_client"] == data.num_nodes
    assert man["clients"][0]["nodes"] == list(range(data.num_nodes))
