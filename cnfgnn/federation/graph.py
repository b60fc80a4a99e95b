"""The graph the server holds, and how many clients it expects."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.nodes import client_groups
from cnfgnn.data.shards import load_manifest
from cnfgnn.data.shards import load_server_graph as read_graph
from cnfgnn.federation.rounds import ServerGraph


def load_server_graph(cfg: Any) -> tuple[ServerGraph, int]:
    """The graph the server holds, and how many clients to expect.

    With ``engine.shards_dir`` (a deployment's shard set, :mod:`cnfgnn.data.shards`): its
    ``server/graph.npz`` and the manifest's client count. Otherwise the graph of the dataset
    in ``cfg.dataset`` (its series are dropped right away) and its client partition.
    ``engine.num_clients`` overrides the count.
    """
    shards_dir = cfg.engine.get("shards_dir")
    expected = cfg.engine.get("num_clients")
    if shards_dir:
        g = read_graph(str(shards_dir))
        ids, locations = g["sensor_ids"], g["locations"]
        assert ids is not None  # read_graph always returns the sensor ids
        manifest = load_manifest(str(shards_dir))
        interval = manifest.get("interval_minutes")  # the shards' step length
        graph = ServerGraph(
            np.asarray(g["adjacency"]),
            [str(s) for s in ids],
            None if locations is None else np.asarray(locations),
            None if interval is None else float(interval),
        )
        if expected is None:
            expected = manifest["num_clients"]
        return graph, int(expected)
    data = load_dataset(cfg.dataset)
    graph = ServerGraph.from_data(data)
    if expected is None:
        expected = len(client_groups(cfg, data))
    del data
    return graph, int(expected)
