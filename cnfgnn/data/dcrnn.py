"""Loaders for the DCRNN formats: ``adj_mx.pkl``, the speed HDF5, and the CNFGNN authors' npz.

* ``adj_mx.pkl``: Python-2 pickle ``[sensor_ids, sensor_id_to_ind, adj_mx]``.
  It is a pickle: only load files you trust.
* ``metr-la.h5`` / ``pems-bay.h5``: pandas HDF5, key ``df``, DatetimeIndex x sensor-id
  columns, 0 = missing.
* ``{train,val,test}.npz`` (CNFGNN archive, docs/method.md §2.7): ``x``, ``y`` of shape
  ``[S, 12, N, 2]`` (speed, time of day), stride-1 windows consecutive across the splits.
  The continuous series is rebuilt and every window checked against it.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cnfgnn.data.checks import (
    check_adjacency,
    check_timestamps,
    match_ids,
    series_from_values,
    timestamps_from_tod,
)
from cnfgnn.data.csvio import load_locations
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.errors import DataError, bad_input, require_file
from cnfgnn.data.gz import open_bytes
from cnfgnn.data.windows import SPLITS, split_starts


def load_adj_pkl(path: str | Path) -> tuple[list[str], dict[str, int], np.ndarray]:
    """Read a DCRNN ``adj_mx.pkl``.

    Returns:
        ``(sensor_ids [N], id_to_index, adjacency [N, N] float32)``.
    """
    p = require_file(path, "adjacency pickle (adj_mx.pkl)", "dataset.adj_pkl")
    try:
        with open_bytes(p) as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # any unpickling failure means "not this format"
        raise bad_input(
            p,
            f"not a readable pickle ({type(e).__name__}: {e})",
            "use DCRNN's adj_mx.pkl / adj_mx_bay.pkl",
        ) from None
    if not (isinstance(obj, (list, tuple)) and len(obj) == 3):
        raise bad_input(
            p,
            f"expected [sensor_ids, sensor_id_to_ind, adj_mx], got {type(obj).__name__}",
            "use DCRNN's adj_mx.pkl format",
        )
    try:  # e.g. [0, 0, 0], or an adjacency of strings
        ids = [str(s) for s in obj[0]]
        id_to_index = {str(k): int(v) for k, v in dict(obj[1]).items()}
        adj_raw = np.asarray(obj[2])
    except (TypeError, ValueError) as e:
        raise bad_input(
            p,
            f"expected [sensor_ids, sensor_id_to_ind, adj_mx] ({type(e).__name__}: {e})",
            "use DCRNN's adj_mx.pkl format",
        ) from None
    adj = check_adjacency(adj_raw, p, len(ids))
    if any(id_to_index.get(s) != i for i, s in enumerate(ids)):
        raise bad_input(
            p,
            "sensor_id_to_ind disagrees with the order of sensor_ids",
            "rebuild the pickle with DCRNN gen_adj_mx.py",
        )
    return ids, id_to_index, adj


def _locations(path: str | Path | None, ids: Sequence[str]) -> np.ndarray | None:
    if path is None:
        return None
    return load_locations(require_file(path, "sensor locations", "dataset.locations"), ids)


def load_dcrnn_h5(
    h5_path: str | Path,
    adj_pkl_path: str | Path,
    locations_path: str | Path | None = None,
    key: str | None = "df",
    name: str = "dcrnn",
    missing_value: float | None = 0.0,
) -> SensorData:
    """METR-LA / PEMS-BAY style HDF5 speeds plus the DCRNN adjacency pickle.

    Args:
        h5_path: pandas HDF5 file: DatetimeIndex x sensor-id columns, 0 = missing.
        adj_pkl_path: the matching DCRNN ``adj_mx.pkl``.
        locations_path: optional sensor locations CSV.
        key: HDF5 key of the table (None: the file's only key).
        name: dataset name.
        missing_value: marker of missing readings.

    Columns are reordered to the pickle's sensor order.
    """
    h5 = require_file(h5_path, "speed series (HDF5)", "dataset.h5")
    ids, _, adj = load_adj_pkl(adj_pkl_path)
    try:
        store = pd.HDFStore(h5, mode="r")
    except Exception as e:  # tables raises HDF5ExtError (a RuntimeError), OSError, ...
        raise bad_input(
            h5,
            f"not a readable HDF5 file ({type(e).__name__})",
            "write it with pandas DataFrame.to_hdf",
        ) from None
    with store:
        keys = [k.lstrip("/") for k in store.keys()]
        if key is None and len(keys) == 1:
            key = keys[0]
        if key not in keys:
            raise bad_input(
                h5,
                f"no HDF5 key {key!r} (keys: {keys})",
                f"set dataset.key to one of {keys}, or write the table with "
                f"df.to_hdf(path, key={key!r})",
            )
        try:
            df = store[key]
        except Exception as e:
            raise bad_input(
                h5,
                f"cannot read key {key!r} ({type(e).__name__}: {e})",
                "write it with pandas DataFrame.to_hdf",
            ) from None
    if not isinstance(df, pd.DataFrame) or not isinstance(df.index, pd.DatetimeIndex):
        raise bad_input(
            h5,
            f"key {key!r} is not a DataFrame indexed by time",
            "store a DataFrame with a DatetimeIndex and one column per sensor",
        )
    interval = check_timestamps(df.index, h5)
    cols = [str(c) for c in df.columns]
    idx = match_ids(cols, ids, h5, "HDF5 columns", f"{Path(adj_pkl_path).name} sensor ids")
    speed, mask = series_from_values(
        df.to_numpy(np.float64)[:, idx], h5, missing_value, columns=ids
    )
    return SensorData(
        name, speed, mask, df.index, interval, ids, adj, _locations(locations_path, ids), str(h5)
    )


def _npz_array(path: Path, key: str) -> np.ndarray:
    """One ``[S, steps, N, C>=2]`` window array from an npz (read alone, to bound memory)."""
    p = require_file(path, f"{path.stem} windows (npz)", "dataset.dir")
    try:
        with np.load(p) as z:
            if key not in z.files:
                raise bad_input(
                    p,
                    f"keys {sorted(z.files)} lack {key!r}",
                    "use the CNFGNN/DCRNN npz files (keys x, y)",
                )
            a = z[key]
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError, ValueError, pickle refusals
        raise bad_input(
            p, f"not a readable npz ({type(e).__name__}: {e})", "re-download the archive"
        ) from None
    if a.dtype.kind not in "fiu":
        raise bad_input(
            p,
            f"{key} holds {a.dtype} values, not numbers",
            "use the CNFGNN/DCRNN npz files (float windows)",
        )
    if a.ndim != 4 or a.shape[0] == 0 or a.shape[3] < 2:
        raise bad_input(
            p,
            f"{key} has shape {a.shape}, not [S, steps, N, >=2] windows",
            "use the CNFGNN/DCRNN npz files",
        )
    return a


def _check_windows(
    series: np.ndarray, arr: np.ndarray, first: int, offset: int, path: Path, chunk: int = 2048
) -> None:
    """Every ``arr[s]`` must equal ``series[first + s + offset : ... + steps]``."""
    steps = arr.shape[1]
    for lo in range(0, len(arr), chunk):
        st = first + offset + np.arange(lo, min(lo + chunk, len(arr)))
        idx = st[:, None] + np.arange(steps)[None, :]  # [chunk, steps]
        if idx[-1, -1] >= len(series) or not np.array_equal(
            series[idx], arr[lo : lo + chunk], equal_nan=True
        ):
            raise bad_input(
                path,
                f"windows {lo}..{min(lo + chunk, len(arr)) - 1} are not "
                "consecutive stride-1 windows of the series the three files "
                "make together",
                "use unshuffled DCRNN-style npz files "
                "(train, val, test in time order, from one series)",
            )


def load_dcrnn_npz(
    dir: str | Path,
    adj_pkl_path: str | Path,
    locations_path: str | Path | None = None,
    start: str = "2012-03-01",
    interval_minutes: float | None = None,
    name: str = "dcrnn-npz",
    missing_value: float | None = 0.0,
    split: tuple[float, float, float] | None = (0.7, 0.1, 0.2),
) -> SensorData:
    """Rebuild the continuous series from the authors' ``{train,val,test}.npz`` windows.

    Args:
        dir: folder holding the three npz files.
        adj_pkl_path: the matching ``adj_mx.pkl``.
        locations_path: optional sensor locations CSV.
        start: day of the first step (its clock time comes from the time-of-day channel).
        interval_minutes: step length; inferred from the time-of-day channel when None.
        name: dataset name.
        missing_value: marker of missing readings (0 in METR-LA/PEMS-BAY).
        split: (train, val, test) fractions the files must have been split with (checked);
            None skips the check.
    """
    d = Path(dir)
    ids, _, adj = load_adj_pkl(adj_pkl_path)
    files = {s: d / f"{s}.npz" for s in SPLITS}
    firsts, counts = [], {}
    shape: tuple[int, ...] | None = None
    for s in SPLITS:  # pass 1: the first step of every window (one array in memory at a time)
        x = _npz_array(files[s], "x")
        if shape is not None and x.shape[1:] != shape:
            raise bad_input(
                files[s],
                f"window shape {x.shape[1:]} differs from train.npz {shape}",
                "use the three files of one archive",
            )
        shape = x.shape[1:]
        firsts.append(x[:, 0].copy())
        counts[s] = len(x)
        tail_x = x[-1, 1:].copy()
        del x
    if shape is None:  # unreachable: SPLITS is not empty
        raise DataError(f"{d}: no window files read")
    n_in, n = shape[0], shape[1]
    if n != len(ids):
        raise bad_input(
            files["train"],
            f"{n} sensors but {Path(adj_pkl_path).name} has {len(ids)}",
            "use the adjacency pickle of the same dataset",
        )
    y_last = _npz_array(files["test"], "y")
    n_out = y_last.shape[1]
    series = np.concatenate(firsts + [tail_x, y_last[-1]])  # [T, N, C]
    del y_last
    t, first = series.shape[0], 0
    for s in SPLITS:  # pass 2: every window, x and y, against the rebuilt series
        for key, offset in (("x", 0), ("y", n_in)):
            arr = _npz_array(files[s], key)
            if (
                arr.shape[0] != counts[s]
                or arr.shape[2:] != shape[1:]
                or (key == "y" and arr.shape[1] != n_out)
            ):
                raise bad_input(
                    files[s],
                    f"{key} has shape {arr.shape}, inconsistent with x {(counts[s],) + shape}",
                    "use the three files of one archive",
                )
            _check_windows(series, arr, first, offset, files[s])
            del arr
        first += counts[s]
    if split is not None:
        want = split_starts(t, n_in, n_out, *split, source=str(d))
        if any(len(want[s]) != counts[s] for s in SPLITS):
            raise bad_input(
                d,
                f"split sizes {counts} differ from the DCRNN rule for "
                f"{tuple(split)}: { {s: len(v) for s, v in want.items()} }",
                "set dataset.split to the fractions the files were made with",
            )
    tod = series[:, 0, 1]
    if not np.allclose(series[:, :, 1], tod[:, None], atol=1e-6):
        raise bad_input(
            d, "time-of-day channel differs between sensors", "channel 1 must be the time of day"
        )
    ts, interval = timestamps_from_tod(tod, start, d, interval_minutes)
    speed, mask = series_from_values(series[:, :, 0], d, missing_value, columns=ids)
    return SensorData(
        name, speed, mask, ts, interval, ids, adj, _locations(locations_path, ids), str(d)
    )
