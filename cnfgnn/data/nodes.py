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


def count_setting(value: Any, unset: tuple[str, ...] = ("null", "none")) -> int | None:
    """A configured count: a positive whole number (an int, its string as a command line
    passes it, or an integral float such as 8.0 from a YAML file or a script), or None for
    ``None`` and the words in ``unset``.

    Raises:
        ValueError: anything else (0, -1, 2.5, "abc"); the caller names the key and the fix.
    """
    if value is None or str(value).strip().lower() in unset:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    n = int(str(value).strip())
    if n < 1:
        raise ValueError(f"{value!r} is not positive")
    return n


def nodes_per_client(value: Any) -> int | None:
    """``federation.nodes_per_client`` as a number of sensors, or None for all in one client.

    Accepts a positive integer (or its string, as a command line passes it) and ``None`` /
    ``"null"`` / ``"none"``; anything else is a :class:`DataError` that names the fix.
    """
    try:
        return count_setting(value)
    except ValueError:
        raise bad_input(
            "federation.nodes_per_client",
            f"{value!r} is not a positive number of sensors",
            "use e.g. nodes_per_client=1 (one client per sensor), 8, or null (all sensors "
            "in one client)",
        ) from None


def partition(nodes: np.ndarray, size: int | str | None) -> list[np.ndarray]:
    """Split ``nodes`` into contiguous groups of ``size`` (the last may be smaller).

    Args:
        nodes: ``[M]`` node indices, in the order clients should get them.
        size: sensors per client, K >= 1, or None: one group of all
            (:func:`nodes_per_client` reads it).

    Returns:
        ``ceil(M / K)`` int64 arrays.
    """
    nodes = np.asarray(nodes, dtype=np.int64)
    k = nodes_per_client(size)
    k = max(len(nodes), 1) if k is None else k
    return [nodes[i : i + k] for i in range(0, len(nodes), k)]


def client_groups(cfg: Any, data: SensorData) -> list[np.ndarray]:
    """Nodes of each client (``cfg.federation.nodes_per_client`` each): with
    ``federation.inductive_ratio`` set, training and held-out nodes never share a client."""
    k = cfg.federation.nodes_per_client
    n = data.num_nodes
    ratio = cfg.federation.inductive_ratio
    if ratio is None:
        return partition(np.arange(n), k)
    seen = select_nodes(n, float(ratio), data.locations, seed=int(cfg.seed))
    unseen = np.setdiff1d(np.arange(n), seen)
    return partition(seen, k) + (partition(unseen, k) if len(unseen) else [])
