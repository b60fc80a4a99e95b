"""CSV readers for series, adjacency matrices, distance lists and sensor locations.

Each reader names the file, row and column of anything it cannot use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cnfgnn.data.checks import check_adjacency, match_ids, preview
from cnfgnn.data.errors import bad_input

NAN_WORDS = {"nan", "+nan", "-nan"}


def _read_strings(path: Path, what: str) -> pd.DataFrame:
    """Every cell as a stripped string, no header interpretation."""
    try:
        df = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise bad_input(path, f"{what} file is empty", "write the data rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise bad_input(
            path,
            f"{what} is not a readable CSV ({e})",
            "write comma-separated rows with the same number of fields",
        ) from None
    return df.apply(lambda c: c.str.strip())


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def to_float(
    cells: pd.DataFrame, path: Path, what: str, row0: int = 0, empty_ok: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Convert string cells to float64, naming the first non-numeric cell.

    Args:
        cells: ``[R, C]`` string cells.
        path: file for errors.
        what: what the cells are ("readings").
        row0: file line of the first row (for messages).
        empty_ok: empty cells are allowed (returned as NaN and flagged).

    Returns:
        ``(values [R, C] float64, empty [R, C] bool)``.
    """
    raw = cells.to_numpy(dtype=object)
    empty = raw == ""
    values = np.full(raw.shape, np.nan)
    for j in range(raw.shape[1]):
        col = pd.to_numeric(pd.Series(raw[:, j]), errors="coerce").to_numpy(np.float64)
        cand = np.flatnonzero(np.isnan(col) & ~empty[:, j])
        bad = [i for i in cand if str(raw[i, j]).lower() not in NAN_WORDS]
        if len(bad):
            raise bad_input(
                path,
                f"non-numeric {what} {raw[bad[0], j]!r} at line "
                f"{row0 + bad[0] + 1}, column {j + 1}",
                "write numbers only (leave missing readings empty)",
            )
        values[:, j] = col
    if not empty_ok and empty.any():
        r, c = np.argwhere(empty)[0]
        raise bad_input(
            path,
            f"empty {what} cell at line {row0 + r + 1}, column {c + 1}",
            "fill every cell (0 for no edge)",
        )
    return values, empty


def read_series_csv(
    path: Path, missing_value: float | str | None = None, timestamp_column: bool = True
) -> tuple[list[str], pd.Index | None, np.ndarray, np.ndarray]:
    """A wide series CSV: header of sensor ids, optional first column of timestamps.

    Returns:
        ``(sensor_ids, timestamps or None, values [T, N] float64, empty [T, N] bool)``;
        cells equal to a string ``missing_value`` count as empty.
    """
    raw = _read_strings(path, "series")
    header = list(raw.iloc[0])
    body = raw.iloc[1:].reset_index(drop=True)
    index = None
    if timestamp_column:
        index = pd.Index(body.iloc[:, 0])
        body, header = body.iloc[:, 1:], header[1:]
    if body.shape[0] == 0 or body.shape[1] == 0:
        raise bad_input(
            path,
            f"series has {body.shape[0]} rows x {body.shape[1]} sensors",
            "write a header of sensor ids and one row per time step",
        )
    if isinstance(missing_value, str):
        body = body.mask(body == missing_value.strip(), "")
    values, empty = to_float(body, path, "reading", row0=1, empty_ok=True)
    return [str(h) for h in header], index, values, empty


def parse_timestamps(index: pd.Index, path: Path) -> pd.DatetimeIndex:
    """Parse the first column of a series CSV into timestamps."""
    try:
        return pd.DatetimeIndex(pd.to_datetime(index, format="mixed"))
    except (ValueError, TypeError) as e:
        raise bad_input(
            path,
            f"first column is not a timestamp column ({e})",
            "put ISO timestamps (2012-03-01 00:05:00) in the first column",
        ) from None


def read_adjacency_csv(path: Path, sensor_ids: Sequence[str]) -> np.ndarray:
    """An N x N adjacency CSV, with or without a header (and index column) of sensor ids.

    With a header, rows and columns are reordered to ``sensor_ids``; without one, the matrix
    must already be in the series' column order.

    Returns:
        ``[N, N]`` float32 in ``sensor_ids`` order.
    """
    ids = [str(s) for s in sensor_ids]
    raw = _read_strings(path, "adjacency")
    first = [c for c in raw.iloc[0] if c != ""]
    has_header = (
        set(first) == set(ids) or not all(_is_number(c) for c in first) or raw.iloc[0, 0] == ""
    )
    if not has_header:
        if raw.shape == (len(ids) + 1, len(ids)):
            raise bad_input(
                path,
                f"{raw.shape[0]} rows x {raw.shape[1]} columns: the first "
                f"row looks like a header, but its ids {preview(first)} are not "
                f"the series' sensor ids {preview(ids)}",
                "write the series' ids in the header (or drop the header)",
            )
        values, _ = to_float(raw, path, "adjacency weight")
        return check_adjacency(values, path, len(ids))
    header = list(raw.iloc[0])
    body = raw.iloc[1:].reset_index(drop=True)
    if len(header) == body.shape[0] + 1:  # first column holds row ids
        row_ids = list(body.iloc[:, 0])
        header, body = header[1:], body.iloc[:, 1:]
        if row_ids != header:
            raise bad_input(
                path,
                "row ids (first column) differ from the header ids",
                "list the sensors in the same order in both",
            )
    values, _ = to_float(body, path, "adjacency weight", row0=1)
    adj = check_adjacency(values, path)
    perm = match_ids(header, ids, path, "adjacency header ids", "the series' sensor ids")
    return check_adjacency(adj[np.ix_(perm, perm)], path, len(ids))


def read_distances_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """A ``from,to,distance`` list, with or without a header row."""
    raw = _read_strings(path, "distance list")
    if raw.shape[1] != 3:
        raise bad_input(
            path,
            f"distance list has {raw.shape[1]} columns, expected 3",
            "write rows of from,to,distance",
        )
    row0 = 0
    if not _is_number(raw.iloc[0, 2]):
        raw, row0 = raw.iloc[1:], 1
    dist, _ = to_float(raw.iloc[:, 2:3], path, "distance", row0=row0)
    return list(raw.iloc[:, 0]), list(raw.iloc[:, 1]), dist[:, 0]


def load_locations(path: str | Path, sensor_ids: Sequence[str]) -> np.ndarray:
    """Sensor coordinates in ``sensor_ids`` order.

    Accepts ``sensor_id,lat,lon`` (PEMS-BAY, no header), ``index,sensor_id,latitude,longitude``
    (METR-LA, header) and any header naming an id column and lat/lon columns. Extra sensors in
    the file are ignored.

    Returns:
        ``[N, 2]`` float64 (latitude, longitude) in degrees.
    """
    path = Path(path)
    raw = _read_strings(path, "locations")
    row0 = 0
    if not (_is_number(raw.iloc[0, -1]) and _is_number(raw.iloc[0, -2])):
        names = [c.lower() for c in raw.iloc[0]]
        raw, row0 = raw.iloc[1:], 1

        def find(*keys: str) -> int:
            for i, n in enumerate(names):
                if any(n == k or n.startswith(k) for k in keys):
                    return i
            raise bad_input(
                path,
                f"no {keys[0]} column in the header {names}",
                "name the columns sensor_id, latitude, longitude",
            )

        cols = [find("sensor_id", "id", "sensor"), find("lat"), find("lon", "lng")]
    elif raw.shape[1] in (3, 4):
        cols = [raw.shape[1] - 3, raw.shape[1] - 2, raw.shape[1] - 1]
    else:
        raise bad_input(
            path, f"{raw.shape[1]} columns without a header", "write sensor_id,lat,lon rows"
        )
    file_ids = list(raw.iloc[:, cols[0]])
    latlon, _ = to_float(raw.iloc[:, cols[1:]], path, "coordinate", row0=row0)
    if (
        not np.isfinite(latlon).all()
        or np.abs(latlon[:, 0]).max() > 90
        or np.abs(latlon[:, 1]).max() > 180
    ):
        raise bad_input(
            path,
            "coordinates outside lat [-90, 90], lon [-180, 180] or not finite",
            "write latitude then longitude in degrees",
        )
    idx = match_ids(
        file_ids, sensor_ids, path, "location ids", "the series' sensor ids", allow_extra=True
    )
    return latlon[idx]
