"""Road-distance graphs: the DCRNN thresholded Gaussian kernel, from distance lists or coordinates.

DCRNN ``gen_adj_mx.py``: ``adj[i, j] = exp(-(d(i -> j) / sigma)^2)`` with sigma the std of all
finite distances, entries below 0.1 set to 0, not symmetrised; here self-loops are set to 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from cnfgnn.data.checks import Source
from cnfgnn.data.errors import bad_input

EARTH_RADIUS_KM = 6371.0088


def gaussian_kernel_adjacency(
    dist: np.ndarray, threshold: float = 0.1, self_loops: bool = True
) -> np.ndarray:
    """Thresholded Gaussian kernel of a directed distance matrix.

    Args:
        dist: ``[N, N]`` distances, ``inf`` where there is no (known) path.
        threshold: weights below this become 0 (DCRNN ``normalized_k``).
        self_loops: set the diagonal to 1.

    Returns:
        ``[N, N]`` float32 adjacency.
    """
    d = np.asarray(dist, dtype=np.float32)
    finite = d[~np.isinf(d)].flatten()
    sigma = finite.std() if finite.size else np.float32(0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        adj = np.exp(-np.square(d / sigma)) if sigma > 0 else (d == 0).astype(np.float32)
    adj = np.nan_to_num(adj, nan=0.0).astype(np.float32)
    adj[adj < threshold] = 0.0
    if self_loops:
        np.fill_diagonal(adj, 1.0)
    return adj


def haversine_km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """``[N, N]`` great-circle distances in km between points given in degrees."""
    phi, lam = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    dphi = phi[:, None] - phi[None, :]
    dlam = lam[:, None] - lam[None, :]
    h = np.sin(dphi / 2) ** 2 + np.cos(phi)[:, None] * np.cos(phi)[None, :] * np.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def distance_matrix(
    src: Sequence[str],
    dst: Sequence[str],
    dist: np.ndarray,
    sensor_ids: Sequence[str],
    source: Source,
) -> np.ndarray:
    """Dense ``[N, N]`` float32 distances from ``from,to,distance`` rows (``inf`` = unlisted).

    Rows naming sensors outside ``sensor_ids`` are skipped (as DCRNN does); a later row for the
    same pair wins.
    """
    d = np.asarray(dist, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(d) | (d < 0))
    if len(bad):
        raise bad_input(
            source,
            f"{len(bad)} distances are negative, NaN or inf, first "
            f"{d[bad[0]]} in row {bad[0]} ({src[bad[0]]} -> {dst[bad[0]]})",
            "distances must be finite and >= 0; leave unknown pairs out",
        )
    pos = {s: i for i, s in enumerate(map(str, sensor_ids))}
    i = np.asarray([pos.get(str(s), -1) for s in src])
    j = np.asarray([pos.get(str(s), -1) for s in dst])
    ok = (i >= 0) & (j >= 0)
    if not ok.any():
        raise bad_input(
            source,
            f"none of the {len(d)} rows names two sensors of the series "
            f"(series ids start {list(sensor_ids)[:3]}, file ids start "
            f"{list(src)[:3]})",
            "use the sensor ids of the series header",
        )
    n = len(sensor_ids)
    out = np.full((n, n), np.inf, dtype=np.float32)
    out[i[ok], j[ok]] = d[ok]
    return out


def graph_fingerprint(adjacency: np.ndarray, sensor_ids: Sequence[str]) -> dict:
    """What identifies a sensor network: its ids in order, edge count, hash of the weights.

    Stored in a run's checkpoint, so that a later forecast can check that the data it is
    given is the network the model was trained on.

    Args:
        adjacency: ``[N, N]`` edge weights.
        sensor_ids: N sensor ids (the column order).

    Returns:
        ``{"sensor_ids": [N] str, "num_edges": int, "adjacency_sha256": str}``.
    """
    adj = np.ascontiguousarray(adjacency, dtype=np.float32)
    return {
        "sensor_ids": [str(s) for s in sensor_ids],
        "num_edges": int((adj != 0).sum()),
        "adjacency_sha256": hashlib.sha256(adj.tobytes()).hexdigest(),
    }
