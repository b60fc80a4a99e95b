"""Standard scaling of speeds from sums and counts (so federated statistics equal pooled ones).

The paper's statistic (docs/method.md §2.4) is the mean and std (ddof 0) of ``train['x'][..., 0]``
flattened: every training window's *input* steps, zeros included, so a time step counts once
per training window whose input covers it. :func:`input_stats` computes exactly those sums per
node without materialising windows; :func:`global_scaler` combines any number of nodes'
(clients') sums into the one scalar mean/std; :func:`per_node_scaler` keeps them per node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # torch is optional for this module
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]


@dataclass
class Scaler:
    """``z = (x - mean) / std`` and back.

    Attributes:
        mean: shape ``[]`` (one global value) or ``[N]`` (per node, broadcast over the last
            axis of the data, which must then be the node axis).
        std: same shape as ``mean``; zeros are replaced by 1 (constant series).
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        std = np.asarray(self.std, dtype=np.float64)
        self.std = np.where(std > 0, std, 1.0)

    def _params(self, x: Any) -> tuple[Any, Any]:
        if torch is not None and isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            return (
                torch.as_tensor(self.mean, dtype=dtype, device=x.device),
                torch.as_tensor(self.std, dtype=dtype, device=x.device),
            )
        x = np.asarray(x)
        np_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
        return self.mean.astype(np_dtype), self.std.astype(np_dtype)

    def transform(self, x: Any) -> Any:
        """Scale ``x`` (numpy array or torch tensor, ``[..., N]`` or any shape if global)."""
        mean, std = self._params(x)
        return (x - mean) / std

    def inverse_transform(self, x: Any) -> Any:
        """Undo :meth:`transform` (back to original units)."""
        mean, std = self._params(x)
        return x * std + mean


def coverage(num_steps: int, starts: np.ndarray, in_steps: int = 12) -> np.ndarray:
    """``[T]`` int64: how many windows' inputs (``t0 .. t0+in-1``) cover each step."""
    diff = np.zeros(num_steps + 1, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    np.add.at(diff, starts, 1)
    np.add.at(diff, np.minimum(starts + in_steps, num_steps), -1)
    return np.cumsum(diff[:-1])


def input_stats(
    speed: np.ndarray,
    starts: np.ndarray,
    in_steps: int = 12,
    include_missing: bool = True,
    mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-node sums over the training inputs, each step weighted by its window count.

    Args:
        speed: ``[T, K]`` readings (missing entries 0).
        starts: ``[S]`` training window starts.
        in_steps: input length.
        include_missing: count missing entries as zeros (the paper) or leave them out.
        mask: ``[T, K]`` bool, True where observed; required when ``include_missing`` is False.

    Returns:
        ``{"sum": [K], "sumsq": [K], "count": [K]}`` float64.
    """
    x = np.asarray(speed, dtype=np.float64)
    c = coverage(x.shape[0], starts, in_steps).astype(np.float64)  # [T]
    if include_missing:
        w = np.broadcast_to(c[:, None], x.shape)
    else:
        if mask is None:
            raise ValueError("input_stats(include_missing=False) needs the mask")
        w = c[:, None] * np.asarray(mask, dtype=np.float64)

    def per_node(a: np.ndarray) -> np.ndarray:
        # each node's row summed on its own (contiguous): bit-identical for any grouping
        return np.ascontiguousarray(a.T).sum(axis=1)

    return {"sum": per_node(w * x), "sumsq": per_node(w * x * x), "count": per_node(w)}


def _mean_std(s: np.ndarray, ss: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    safe = np.where(n > 0, n, 1.0)
    mean = np.where(n > 0, s / safe, 0.0)
    var = np.maximum(np.where(n > 0, ss / safe - mean * mean, 1.0), 0.0)
    return mean, np.sqrt(var)


def global_scaler(stats_list: Iterable[dict[str, np.ndarray]]) -> Scaler:
    """One scalar mean/std from several nodes' (or clients') :func:`input_stats`.

    The sums are added exactly (``math.fsum``), so any grouping of the same nodes gives a
    bit-identical scaler.
    """
    parts: dict[str, list[float]] = {"sum": [], "sumsq": [], "count": []}
    for st in stats_list:
        for k, v in parts.items():
            v.extend(np.asarray(st[k], dtype=np.float64).ravel().tolist())
    # exact summation: the result does not depend on how nodes are grouped into clients
    tot = {k: math.fsum(v) for k, v in parts.items()}
    if tot["count"] <= 0:
        raise ValueError("global_scaler: no observations in the training inputs")
    mean, std = _mean_std(
        np.asarray(tot["sum"]), np.asarray(tot["sumsq"]), np.asarray(tot["count"])
    )
    return Scaler(mean, std)


def per_node_scaler(stats: dict[str, np.ndarray]) -> Scaler:
    """Per-node ``[K]`` mean/std from :func:`input_stats` (nodes without data get 0/1)."""
    mean, std = _mean_std(
        np.asarray(stats["sum"], np.float64),
        np.asarray(stats["sumsq"], np.float64),
        np.asarray(stats["count"], np.float64),
    )
    return Scaler(mean, std)
