"""Builders of small data files in every supported format, for the data tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from cnfgnn.data.windows import gather_windows, split_starts

REPO = Path(__file__).resolve().parents[2]
BUNDLED_DATA = REPO / "data"  # the real datasets shipped in the package (data/README.md)
IDS = ["s10", "s20", "s30", "s40"]


def series(t: int = 60, n: int = 4, seed: int = 0, start: str = "2020-03-01") -> pd.DataFrame:
    """A ``[T, N]`` frame of speeds with a 5-minute DatetimeIndex and a few zeros."""
    rng = np.random.default_rng(seed)
    v = np.round(rng.uniform(20, 70, (t, n)), 3)
    v[3, 1] = 0.0
    v[10, 2] = 0.0
    idx = pd.date_range(start, periods=t, freq="5min")
    return pd.DataFrame(
        v, index=idx, columns=IDS[:n] if n <= len(IDS) else [f"s{i}" for i in range(n)]
    )


def adjacency(n: int = 4) -> np.ndarray:
    """A directed chain with self-loops."""
    a = np.eye(n, dtype=np.float32)
    for i in range(n - 1):
        a[i, i + 1] = 0.5
    return a


def write_pkl(path: Path, ids: list[str], adj: np.ndarray) -> Path:
    """A DCRNN-style adjacency pickle (protocol 2, like the Python-2 originals)."""
    with path.open("wb") as f:
        pickle.dump([ids, {s: i for i, s in enumerate(ids)}, adj], f, protocol=2)
    return path


def write_npz_splits(
    folder: Path, values: np.ndarray, tod: np.ndarray, in_steps: int = 12, out_steps: int = 12
) -> dict[str, np.ndarray]:
    """DCRNN ``generate_training_data``-style ``{train,val,test}.npz`` from a ``[T, N]`` series.

    Returns the ``x`` arrays per split (for comparison).
    """
    folder.mkdir(parents=True, exist_ok=True)
    t, n = values.shape
    feats = np.stack([values, np.broadcast_to(tod[:, None], (t, n))], axis=-1)  # [T, N, 2]
    out = {}
    for name, st in split_starts(t, in_steps, out_steps).items():
        x = gather_windows(feats, st, in_steps)
        y = gather_windows(feats, st + in_steps, out_steps)
        np.savez_compressed(
            folder / f"{name}.npz",
            x=x,
            y=y,
            x_offsets=np.arange(-in_steps + 1, 1)[:, None],
            y_offsets=np.arange(1, out_steps + 1)[:, None],
        )
        out[name] = x
    return out


def write_wide_csv(path: Path, df: pd.DataFrame, blank: list[tuple[int, int]] = ()) -> Path:
    """Series CSV: first column timestamps, header = sensor ids; ``blank`` cells left empty."""
    body = df.astype(object)
    for r, c in blank:
        body.iat[r, c] = ""
    body.to_csv(path, index_label="timestamp")
    return path
