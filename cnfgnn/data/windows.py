"""Sliding windows and the chronological DCRNN train/val/test split.

A window starting at ``t0`` has input steps ``t0 .. t0+in-1`` and target steps
``t0+in .. t0+in+out-1``. Windows slide by one step. With ``S = T - in - out + 1`` windows,
test is the last ``round(test * S)``, train the first ``round(train * S)``, val the rest
(DCRNN ``generate_training_data.py``; METR-LA: 23,974 / 3,425 / 6,850).
"""

from __future__ import annotations

import numpy as np

from cnfgnn.data.errors import bad_input

SPLITS = ("train", "val", "test")


def num_windows(num_steps: int, in_steps: int = 12, out_steps: int = 12) -> int:
    """``S = T - in - out + 1`` (may be <= 0 when the series is too short)."""
    return int(num_steps) - int(in_steps) - int(out_steps) + 1


def split_starts(
    num_steps: int,
    in_steps: int = 12,
    out_steps: int = 12,
    train: float = 0.7,
    val: float = 0.1,
    test: float = 0.2,
    source: str = "the series",
) -> dict[str, np.ndarray]:
    """Window start indices of each split, chronological.

    Args:
        num_steps: T, length of the series.
        in_steps: input length.
        out_steps: target length.
        train: fraction of windows for training (rounded half to even, as DCRNN).
        val: fraction for validation (gets the remainder; checked to sum to 1).
        test: fraction for test (rounded).
        source: dataset name for error messages.

    Returns:
        ``{"train": [S_tr], "val": [S_va], "test": [S_te]}`` int64 start indices.
    """
    if in_steps < 1 or out_steps < 1:
        raise bad_input(source, f"in_steps={in_steps}, out_steps={out_steps}", "both must be >= 1")
    if min(train, val, test) < 0 or abs(train + val + test - 1.0) > 1e-6:
        raise bad_input(
            source,
            f"split fractions train={train}, val={val}, test={test} must be >= 0 and sum to 1",
            "fix dataset.split",
        )
    s = num_windows(num_steps, in_steps, out_steps)
    if s < 1:
        raise bad_input(
            source,
            f"{num_steps} time steps are fewer than one window of {in_steps} + {out_steps} steps",
            "use a longer series or shorter dataset.in_steps/out_steps",
        )
    n_test = int(round(test * s))
    n_train = int(round(train * s))
    n_val = s - n_train - n_test
    counts = {"train": n_train, "val": n_val, "test": n_test}
    empty = [k for k, c in counts.items() if c <= 0]
    if empty:
        raise bad_input(
            source,
            f"{s} windows give an empty {'/'.join(empty)} split ({counts})",
            "use a longer series or change dataset.split",
        )
    starts = np.arange(s, dtype=np.int64)
    return {
        "train": starts[:n_train],
        "val": starts[n_train : n_train + n_val],
        "test": starts[n_train + n_val :],
    }


def gather_windows(series: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Cut windows out of a series with one fancy-indexing gather.

    Args:
        series: ``[T, ...]`` array (numpy).
        starts: ``[S]`` start indices.
        length: steps per window.

    Returns:
        ``[S, length, ...]`` with ``out[s, k] = series[starts[s] + k]``.
    """
    starts = np.asarray(starts, dtype=np.int64)
    if starts.size and (starts.min() < 0 or starts.max() + length > len(series)):
        raise IndexError(
            f"windows [{starts.min()}, {starts.max() + length}) exceed the "
            f"series length {len(series)}"
        )
    idx = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]  # [S, length]
    return series[idx]
