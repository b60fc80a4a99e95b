"""Training-node selection for the inductive setting, and the node -> client partition.

The paper (docs/method.md §1.3, Appendix A) trains on the westernmost fraction of the
sensors: sort by longitude ascending and keep the first ``np.round(N * ratio)`` (round half
to even).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnfgnn.data.dataset import SensorData
from cnfgnn.data.errors import bad_input


def select_nodes(
    num_nodes: int, ratio: float, locations: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Indices of the training nodes, sorted ascending.

    Args:
        num_nodes: N.
        ratio: fraction of nodes to keep, in (0, 1].
        locations: ``[N, 2]`` (lat, lon); when given, keep the westernmost (smallest
            longitude first, stable sort). When None, a random subset from ``seed``.
        seed: seed for the random subset.

    Returns:
        ``[np.round(N * ratio)]`` int64 sorted node indices.
    """
    if not 0.0 < ratio <= 1.0:
        raise bad_input(
            "inductive node selection",
            f"ratio {ratio} is not in (0, 1]",
            "set federation.inductive_ratio to e.g. 0.25, 0.5 or 0.75",
        )
    k = int(np.round(num_nodes * ratio))
    if k < 1:
        raise bad_input(
            "inductive node selection",
            f"ratio {ratio} of {num_nodes} nodes keeps no node",
            "use a larger ratio",
        )
    if locations is not None:
        loc = np.asarray(locations, dtype=np.float64)
        if loc.shape != (num_nodes, 2):
            raise bad_input(
                "inductive node selection",
                f"locations shape {loc.shape}, expected ({num_nodes}, 2)",
                "give (lat, lon) per node",
            )
        order = np.argsort(loc[:, 1], kind="stable")
    else:
        order = np.random.default_rng(seed).permutation(num_nodes)
    return np.sort(order[:k]).astype(np.int64)


def partition(nodes: np.ndarray, nodes_per_client: int) -> list[np.ndarray]:
    """Split ``nodes`` into contiguous groups of ``nodes_per_client`` (the last may be smaller).

    Args:
        nodes: ``[M]`` node indices, in the order clients should get them.
        nodes_per_client: K >= 1.

    Returns:
        ``ceil(M / K)`` int64 arrays.
    """
    if int(nodes_per_client) < 1:
        raise bad_input(
            "partition",
            f"nodes_per_client={nodes_per_client}",
            "use a positive number of sensors per client",
        )
    nodes = np.asarray(nodes, dtype=np.int64)
    k = int(nodes_per_client)
    return [nodes[i : i + k] for i in range(0, len(nodes), k)]


def client_groups(cfg: Any, data: SensorData) -> list[np.ndarray]:
    """Nodes of each client (``cfg.federation.nodes_per_client`` each): with
    ``federation.inductive_ratio`` set, training and held-out nodes never share a client."""
    k = int(cfg.federation.nodes_per_client)
    n = data.num_nodes
    ratio = cfg.federation.inductive_ratio
    if ratio is None:
        return partition(np.arange(n), k)
    seen = select_nodes(n, float(ratio), data.locations, seed=int(cfg.seed))
    unseen = np.setdiff1d(np.arange(n), seen)
    return partition(seen, k) + (partition(unseen, k) if len(unseen) else [])
