"""The in-memory sensor network: speed series, missing mask, time axis and graph.

Shapes:
    speed, mask: ``[T, N]`` (time steps x sensors); adjacency: ``[N, N]``;
    features(): ``[T, N, 2]`` = (speed, time of day); edge_index(): ``[2, E]`` + ``[E]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cnfgnn.data.errors import bad_input

NS_PER_DAY = 86_400 * 10**9


@dataclass
class SensorData:
    """A sensor network's history and road graph (what every loader returns).

    Attributes:
        name: dataset name (used in messages and outputs).
        speed: ``[T, N]`` float32 readings in original units (mph); missing entries are 0.0.
        mask: ``[T, N]`` bool, True where a reading was observed.
        timestamps: length-T regular time axis.
        interval_minutes: step length in minutes.
        sensor_ids: N sensor ids (strings), the column order of ``speed``.
        adjacency: ``[N, N]`` float32, ``adjacency[i, j]`` = weight of the directed edge
            ``i -> j`` (DCRNN convention: kernel of the road distance from i to j);
            self-loops kept.
        locations: ``[N, 2]`` (latitude, longitude) in degrees, or None.
        source: the file (or folder) the series was read from; error messages name it
            (:attr:`where`). Empty for generated data.
    """

    name: str
    speed: np.ndarray
    mask: np.ndarray
    timestamps: pd.DatetimeIndex
    interval_minutes: float
    sensor_ids: list[str]
    adjacency: np.ndarray
    locations: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self.speed = np.asarray(self.speed, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        self.adjacency = np.asarray(self.adjacency, dtype=np.float32)
        self.sensor_ids = [str(s) for s in self.sensor_ids]
        self.timestamps = pd.DatetimeIndex(self.timestamps).as_unit("ns")
        self.interval_minutes = float(self.interval_minutes)
        if self.locations is not None:
            self.locations = np.asarray(self.locations, dtype=np.float64)
        t, n = self.speed.shape if self.speed.ndim == 2 else (None, None)
        problems = []
        if self.speed.ndim != 2:
            problems.append(f"speed has shape {self.speed.shape}, expected [T, N]")
        elif self.mask.shape != self.speed.shape:
            problems.append(f"mask shape {self.mask.shape} != speed shape {self.speed.shape}")
        if t is not None and len(self.timestamps) != t:
            problems.append(f"{len(self.timestamps)} timestamps for {t} steps")
        if n is not None and len(self.sensor_ids) != n:
            problems.append(f"{len(self.sensor_ids)} sensor ids for {n} series")
        if n is not None and self.adjacency.shape != (n, n):
            problems.append(f"adjacency shape {self.adjacency.shape} for {n} sensors")
        if self.locations is not None and n is not None and self.locations.shape != (n, 2):
            problems.append(f"locations shape {self.locations.shape}, expected ({n}, 2)")
        if problems:
            raise bad_input(
                self.where,
                "inconsistent dataset: " + "; ".join(problems),
                "build SensorData from arrays of matching shapes",
            )

    @property
    def where(self) -> str:
        """What error messages name: the user's file when there is one, else the name."""
        return self.source or self.name

    @property
    def num_nodes(self) -> int:
        """N, the number of sensors."""
        return int(self.speed.shape[1])

    @property
    def num_steps(self) -> int:
        """T, the number of time steps."""
        return int(self.speed.shape[0])

    def time_of_day(self) -> np.ndarray:
        """``[T]`` float32 fraction of the day in [0, 1) (DCRNN's time-of-day feature)."""
        ns = self.timestamps.asi8 - self.timestamps.normalize().asi8  # since local midnight
        return (np.mod(ns, NS_PER_DAY) / NS_PER_DAY).astype(np.float32)

    def features(self) -> np.ndarray:
        """``[T, N, 2]`` float32: channel 0 speed, channel 1 time of day."""
        tod = np.broadcast_to(self.time_of_day()[:, None], self.speed.shape)
        return np.stack([self.speed, tod], axis=-1).astype(np.float32)

    def edge_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Sparse graph: ``([2, E] int64 source -> target, [E] float32 weights)``.

        One edge per non-zero ``adjacency[i, j]``, in row-major order (as PyG
        ``dense_to_sparse``), self-loops included.
        """
        src, dst = np.nonzero(self.adjacency)
        index = np.stack([src, dst]).astype(np.int64)
        return index, self.adjacency[src, dst].astype(np.float32)

    def subset(self, nodes: np.ndarray) -> SensorData:
        """Induced sub-network on ``nodes`` (kept in the given order).

        Args:
            nodes: ``[K]`` node indices into this dataset.

        Returns:
            A SensorData with ``[T, K]`` series and the ``[K, K]`` adjacency block.
        """
        idx = np.asarray(nodes, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= self.num_nodes)):
            raise bad_input(
                self.where,
                f"subset indices must be a 1-D array in "
                f"[0, {self.num_nodes}), got {idx.tolist()[:10]}",
                "pass node indices of this dataset",
            )
        return SensorData(
            name=self.name,
            speed=self.speed[:, idx],
            mask=self.mask[:, idx],
            timestamps=self.timestamps,
            interval_minutes=self.interval_minutes,
            sensor_ids=[self.sensor_ids[i] for i in idx],
            adjacency=self.adjacency[np.ix_(idx, idx)],
            locations=None if self.locations is None else self.locations[idx],
            source=self.source,
        )

    def missing_fraction(self) -> float:
        """Fraction of ``[T, N]`` entries that are missing."""
        return float(1.0 - self.mask.mean()) if self.mask.size else 0.0
