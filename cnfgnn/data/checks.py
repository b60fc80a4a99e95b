"""Validation shared by the loaders: adjacency, series values, time axis, sensor ids.

Every check takes the ``source`` (file name) it reports in its :class:`DataError`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from os import PathLike

import numpy as np
import pandas as pd

from cnfgnn.data.errors import bad_input

Source = str | PathLike[str]


def _cell(index: np.ndarray, columns: Sequence[str] | None = None) -> str:
    """Human-readable position of a bad cell (row, and column name when known)."""
    if index.size == 1:
        return f"data row {int(index[0])} (0-based)"
    row, col = int(index[0]), int(index[1])
    name = columns[col] if columns is not None else col
    return f"data row {row} (0-based), column {name!r}"


def preview(items: Sequence[str], k: int = 5) -> str:
    """The first ``k`` items, with an ellipsis when there are more."""
    return f"{list(items[:k])}{'...' if len(items) > k else ''}"


def check_adjacency(adj: np.ndarray, source: Source, num_nodes: int | None = None) -> np.ndarray:
    """Check a dense weighted adjacency and return it as float32.

    Args:
        adj: ``[N, N]`` weights, ``adj[i, j]`` = edge ``i -> j``.
        source: file the matrix came from.
        num_nodes: expected N (the number of series), if known.

    Returns:
        ``[N, N]`` float32 copy.
    """
    a = np.asarray(adj)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise bad_input(
            source,
            f"adjacency has shape {a.shape}, not square N x N",
            "write one row and one column per sensor, in the same order",
        )
    if not np.issubdtype(a.dtype, np.number):
        raise bad_input(
            source,
            f"adjacency holds non-numeric values (dtype {a.dtype})",
            "write plain numbers (0 for no edge)",
        )
    a = a.astype(np.float32)
    bad = np.argwhere(~np.isfinite(a))
    if len(bad):
        raise bad_input(
            source,
            f"adjacency has {len(bad)} NaN/inf entries, first at "
            f"(row {bad[0][0]}, column {bad[0][1]})",
            "write 0 for no edge",
        )
    neg = np.argwhere(a < 0)
    if len(neg):
        raise bad_input(
            source,
            f"adjacency has {len(neg)} negative weights, first "
            f"{a[tuple(neg[0])]} at (row {neg[0][0]}, column {neg[0][1]})",
            "edge weights must be >= 0 (0 = no edge)",
        )
    if num_nodes is not None and a.shape[0] != num_nodes:
        raise bad_input(
            source,
            f"adjacency is {a.shape[0]} x {a.shape[0]} but the series has {num_nodes} sensors",
            "give one row/column per sensor of the series",
        )
    return a


def series_from_values(
    values: np.ndarray,
    source: Source,
    missing_value: float | None = None,
    empty: np.ndarray | None = None,
    columns: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn raw readings into ``(speed, mask)``, refusing undeclared NaN/inf.

    Args:
        values: ``[T, N]`` numbers as read from the file.
        source: file name for errors.
        missing_value: the file's marker for a missing reading (e.g. 0.0), or None.
        empty: ``[T, N]`` bool, True for cells that were empty in the file (missing).
        columns: sensor ids, to name the column of a bad cell.

    Returns:
        speed ``[T, N]`` float32 with missing entries set to 0.0, and mask ``[T, N]`` bool
        (True where observed).
    """
    v = np.asarray(values, dtype=np.float64)
    missing = np.zeros(v.shape, dtype=bool) if empty is None else np.asarray(empty, bool).copy()
    if missing_value is not None:
        if np.isnan(missing_value):
            missing |= np.isnan(v)
        else:
            missing |= v == missing_value
    bad = np.argwhere(~np.isfinite(v) & ~missing)
    if len(bad):
        marker = "none" if missing_value is None else repr(missing_value)
        raise bad_input(
            source,
            f"{len(bad)} NaN/inf readings, first {v[tuple(bad[0])]} at "
            f"{_cell(bad[0], columns)} (declared missing marker: {marker})",
            "leave missing readings empty, or declare the marker with dataset.missing_value",
        )
    speed = np.where(missing, 0.0, v).astype(np.float32)
    return speed, ~missing


def check_timestamps(ts: pd.DatetimeIndex, source: Source) -> float:
    """Check a time axis is strictly increasing and regular; return the step in minutes.

    Args:
        ts: the timestamps, length T >= 2.
        source: file name for errors.
    """
    if len(ts) < 2:
        raise bad_input(source, f"only {len(ts)} time step(s)", "give at least two rows")
    ts = pd.DatetimeIndex(ts).as_unit("ns")
    ns = ts.asi8
    d = np.diff(ns)
    dup = np.flatnonzero(d == 0)
    if len(dup):
        raise bad_input(
            source,
            f"duplicate timestamp {ts[dup[0]]} (rows {dup[0]} and "
            f"{dup[0] + 1}); {len(dup)} duplicate(s) in all",
            "keep one row per time step",
        )
    back = np.flatnonzero(d < 0)
    if len(back):
        raise bad_input(
            source,
            f"timestamps go backwards at row {back[0] + 1} ({ts[back[0]]} then {ts[back[0] + 1]})",
            "sort the rows by time",
        )
    step = int(np.median(d))
    odd = np.flatnonzero(d != step)
    if len(odd):
        i = odd[0]
        raise bad_input(
            source,
            f"irregular interval: {len(odd)} step(s) differ from "
            f"{step / 6e10:g} min, first {ts[i]} -> {ts[i + 1]} at row {i + 1}",
            "resample to a regular grid and leave the readings of inserted rows empty (missing)",
        )
    return step / 6e10


def regular_timestamps(
    start: str | pd.Timestamp, num_steps: int, interval_minutes: float
) -> pd.DatetimeIndex:
    """``num_steps`` timestamps from ``start`` every ``interval_minutes``."""
    return pd.date_range(
        pd.Timestamp(start),
        periods=num_steps,
        freq=pd.Timedelta(minutes=float(interval_minutes)),
        unit="ns",
    )


def timestamps_from_tod(
    tod: np.ndarray,
    start_date: str | pd.Timestamp,
    source: Source,
    interval_minutes: float | None = None,
    atol: float = 1e-3,
) -> tuple[pd.DatetimeIndex, float]:
    """Rebuild timestamps from a time-of-day channel and a start date.

    The first step's clock time is taken from ``tod[0]``; the interval from the channel's
    steps unless given. Every step must agree with the channel.

    Args:
        tod: ``[T]`` time-of-day fractions in [0, 1).
        start_date: the day of the first step (its clock time is ignored).
        source: file name for errors.
        interval_minutes: step length; inferred from ``tod`` when None.
        atol: tolerance in fractions of a day.

    Returns:
        ``(timestamps, interval_minutes)``.
    """
    tod = np.asarray(tod, dtype=np.float64)
    if interval_minutes is None:
        if len(tod) < 2:
            raise bad_input(
                source, "cannot infer the interval from one step", "set dataset.interval_minutes"
            )
        steps = np.mod(np.diff(tod), 1.0)
        interval_minutes = float(np.round(np.median(steps) * 1440.0, 6))
        if interval_minutes <= 0:
            raise bad_input(
                source,
                "time-of-day channel does not advance",
                "check that channel 1 holds the time of day",
            )
    day = pd.Timestamp(start_date).normalize()
    first = day + pd.Timedelta(minutes=round(tod[0] * 1440.0 / interval_minutes) * interval_minutes)
    ts = regular_timestamps(first, len(tod), interval_minutes)
    expect = (ts.asi8 - ts.normalize().asi8) / 86_400e9
    err = np.abs(np.mod(expect - tod + 0.5, 1.0) - 0.5)
    bad = np.flatnonzero(err > atol)
    if len(bad):
        i = bad[0]
        raise bad_input(
            source,
            f"time-of-day channel is not a regular {interval_minutes:g}-min "
            f"clock: step {i} has {tod[i]:.5f}, expected {expect[i]:.5f}",
            "the series must be consecutive (stride-1 windows, no gaps)",
        )
    return ts, float(interval_minutes)


def match_ids(
    found: Sequence[str],
    expected: Sequence[str],
    source: Source,
    what: str,
    against: str,
    allow_extra: bool = False,
) -> np.ndarray:
    """Positions of ``expected`` ids within ``found``; error if the two id sets differ.

    Args:
        found: ids in the file being read (e.g. the HDF5 columns).
        expected: ids in the reference order (e.g. the adjacency's sensor list).
        source: file name for errors.
        what: what ``found`` is ("series columns").
        against: what ``expected`` comes from ("adj_mx.pkl sensor ids").
        allow_extra: accept ids in ``found`` that are not expected (they are ignored).

    Returns:
        ``[N]`` int64 such that ``found[idx[k]] == expected[k]``.
    """
    found = [str(x).strip() for x in found]
    expected = [str(x).strip() for x in expected]
    pos = {s: i for i, s in enumerate(found)}
    if len(pos) != len(found):
        dup = sorted(s for s, c in Counter(found).items() if c > 1)[:5]
        raise bad_input(source, f"duplicate sensor ids in {what}: {dup}", "make ids unique")
    missing = [s for s in expected if s not in pos]
    extra = [] if allow_extra else sorted(set(found) - set(expected))
    if missing or extra:
        raise bad_input(
            source,
            f"{what} ({len(found)} sensors) do not match {against} "
            f"({len(expected)} sensors): missing {preview(missing)}, "
            f"unexpected {preview(extra)}",
            "use files that belong together (the same sensor ids)",
        )
    return np.asarray([pos[s] for s in expected], dtype=np.int64)
