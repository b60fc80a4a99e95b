"""Loaders for plain-text formats: Los-loop CSVs, a user's wide CSV, and STGraph's METRLA.json.

* Los-loop (T-GCN): ``los_speed.csv`` (header = sensor ids, one row per step, no timestamp
  column) + ``los_adj.csv`` (N x N, no header).
* User CSV: first column timestamps, one column per sensor (header = ids); the graph from
  exactly one of an adjacency CSV, a ``from,to,distance`` list or a ``sensor_id,lat,lon`` list
  (both via the DCRNN Gaussian kernel).
* ``METRLA.json``: keys ``edges``, ``weights``, ``time_periods`` and ``"0".."T-1"``, each
  ``[N, 2]`` = (speed, time of day); zeros are missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnfgnn.data.checks import (
    check_adjacency,
    check_timestamps,
    match_ids,
    regular_timestamps,
    series_from_values,
    timestamps_from_tod,
)
from cnfgnn.data.csvio import (
    load_locations,
    parse_timestamps,
    read_adjacency_csv,
    read_distances_csv,
    read_series_csv,
)
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.dcrnn import load_adj_pkl
from cnfgnn.data.errors import bad_input, require_file
from cnfgnn.data.graph import distance_matrix, gaussian_kernel_adjacency, haversine_km
from cnfgnn.data.gz import read_text

PathLike = str | Path


def _numeric_missing(missing_value: float | str | None) -> float | None:
    return None if missing_value is None or isinstance(missing_value, str) else float(missing_value)


#: ``dataset.graph`` choices for Los-loop: the authors' directed DCRNN graph, or T-GCN's.
LOS_LOOP_GRAPHS = ("metr_la", "los_adj")


def load_los_loop(
    speed_csv: PathLike,
    adj_csv: PathLike | None = None,
    start: str = "2012-03-01",
    interval_minutes: float = 5.0,
    locations_path: PathLike | None = None,
    name: str = "los-loop",
    missing_value: float | None = 0.0,
    graph: str = "los_adj",
    adj_pkl_path: PathLike | None = None,
) -> SensorData:
    """T-GCN's Los-loop: a speed CSV without timestamps, and one of two road graphs.

    Args:
        speed_csv: ``[T rows, N columns]`` speeds, header = sensor ids.
        adj_csv: N x N weights (header optional; reordered to the speed header when present);
            used when ``graph="los_adj"``.
        start: timestamp of the first row.
        interval_minutes: step length.
        locations_path: optional sensor locations CSV.
        name: dataset name.
        missing_value: marker of missing readings (Los-loop is imputed: none).
        graph: ``"los_adj"``: T-GCN's ``los_adj.csv`` (symmetric, max(A, A^T));
            ``"metr_la"``: DCRNN's directed ``adj_mx.pkl`` (``adj_pkl_path``), the graph the
            CNFGNN authors used, reordered to the speed header.
        adj_pkl_path: DCRNN ``adj_mx.pkl`` (used when ``graph="metr_la"``).
    """
    sp = require_file(speed_csv, "Los-loop speed CSV", "dataset.speed")
    if graph not in LOS_LOOP_GRAPHS:
        raise bad_input(
            f"dataset {name!r}",
            f"unknown graph {graph!r}",
            f"set dataset.graph to one of {list(LOS_LOOP_GRAPHS)}",
        )
    if graph == "los_adj":
        if adj_csv is None:
            raise bad_input(
                f"dataset {name!r}",
                "graph=los_adj needs the adjacency CSV",
                "set dataset.adjacency=PATH (T-GCN's los_adj.csv)",
            )
        gp = require_file(adj_csv, "Los-loop adjacency CSV", "dataset.adjacency")
    else:
        if adj_pkl_path is None:
            raise bad_input(
                f"dataset {name!r}",
                "graph=metr_la needs the adjacency pickle",
                "set dataset.adj_pkl=PATH (DCRNN's adj_mx.pkl)",
            )
        gp = require_file(adj_pkl_path, "adjacency pickle (adj_mx.pkl)", "dataset.adj_pkl")
    ids, _, values, empty = read_series_csv(sp, missing_value, timestamp_column=False)
    speed, mask = series_from_values(values, sp, _numeric_missing(missing_value), empty, ids)
    if graph == "los_adj":
        adj = read_adjacency_csv(gp, ids)
    else:
        pkl_ids, _, pkl_adj = load_adj_pkl(gp)
        idx = match_ids(pkl_ids, ids, gp, "adj_mx.pkl sensor ids", f"the header of {sp.name}")
        adj = pkl_adj[np.ix_(idx, idx)]
    ts = regular_timestamps(start, speed.shape[0], interval_minutes)
    loc = (
        None
        if locations_path is None
        else load_locations(
            require_file(locations_path, "sensor locations", "dataset.locations"), ids
        )
    )
    return SensorData(name, speed, mask, ts, interval_minutes, ids, adj, loc, str(sp))


def load_csv(
    series_csv: PathLike,
    adjacency: PathLike | None = None,
    distances: PathLike | None = None,
    locations: PathLike | None = None,
    missing_value: float | str | None = None,
    name: str = "csv",
    threshold: float = 0.1,
) -> SensorData:
    """A user's wide CSV of readings plus a graph from exactly one of three files.

    Args:
        series_csv: first column timestamps (regular interval), one column per sensor,
            header = sensor ids; empty cells (or ``missing_value``) are missing.
        adjacency: N x N weights CSV, with or without a header of ids.
        distances: ``from,to,distance`` rows (road distances, directed).
        locations: ``sensor_id,lat,lon`` rows (great-circle distances).
        missing_value: the file's marker for a missing reading, if any (e.g. 0 or "NA").
        name: dataset name.
        threshold: Gaussian-kernel weights below this are dropped.
    """
    sp = require_file(series_csv, "series CSV", "dataset.series")
    given = {
        k: v
        for k, v in (("adjacency", adjacency), ("distances", distances), ("locations", locations))
        if v not in (None, "")
    }
    if len(given) != 1:
        raise bad_input(
            sp,
            f"the graph needs exactly one of adjacency / distances / locations, "
            f"got {sorted(given) or 'none'}",
            "set one of dataset.adjacency, dataset.distances, dataset.locations",
        )
    ids, index, values, empty = read_series_csv(sp, missing_value)
    ts = parse_timestamps(index, sp)
    interval = check_timestamps(ts, sp)
    speed, mask = series_from_values(values, sp, _numeric_missing(missing_value), empty, ids)
    loc = None
    if adjacency not in (None, ""):
        adj = read_adjacency_csv(require_file(adjacency, "adjacency CSV", "dataset.adjacency"), ids)
    elif distances not in (None, ""):
        dp = require_file(distances, "distance list", "dataset.distances")
        src, dst, d = read_distances_csv(dp)
        adj = gaussian_kernel_adjacency(distance_matrix(src, dst, d, ids, dp), threshold)
    else:
        assert locations is not None  # exactly one graph file is given (checked above)
        loc = load_locations(require_file(locations, "sensor locations", "dataset.locations"), ids)
        adj = gaussian_kernel_adjacency(haversine_km(loc[:, 0], loc[:, 1]), threshold)
    return SensorData(name, speed, mask, ts, interval, ids, adj, loc, str(sp))


def _json_ids(path: Path, n: int) -> list[str]:
    """Sensor ids from ``graph_sensor_ids.txt`` (or ``.txt.gz``) next to the json, else
    ``"0".."N-1"``."""
    ids_file = next(
        (
            f
            for f in (path.parent / "graph_sensor_ids.txt", path.parent / "graph_sensor_ids.txt.gz")
            if f.is_file()
        ),
        None,
    )
    if ids_file is None:
        return [str(i) for i in range(n)]
    ids = [s.strip() for s in read_text(ids_file).replace("\n", ",").split(",") if s.strip()]
    if len(ids) != n:
        raise bad_input(
            ids_file,
            f"{len(ids)} sensor ids for {n} series in {path.name}",
            "use the graph_sensor_ids.txt of the same dataset, or remove it",
        )
    return ids


def load_metrla_json(
    path: PathLike,
    locations_path: PathLike | None = None,
    start: str = "2012-03-01",
    name: str = "metr-la-json",
    missing_value: float | None = 0.0,
) -> SensorData:
    """STGraph-Datasets ``METRLA.json`` (a raw METR-LA subset; zeros become masked)."""
    p = require_file(path, "METRLA.json", "dataset.path")
    try:
        obj = json.loads(read_text(p))
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError) as e:
        raise bad_input(p, f"not valid JSON ({e})", "use STGraph's METRLA.json") from None
    need = {"edges", "weights", "time_periods"}
    if not isinstance(obj, dict) or not need <= set(obj):
        absent_keys = sorted(need - set(obj) if isinstance(obj, dict) else need)
        raise bad_input(
            p,
            f"missing keys {absent_keys}",
            "use STGraph's METRLA.json (edges, weights, time_periods, '0'..)",
        )
    fix = (
        "use STGraph's METRLA.json: integer time_periods, steps '0'.. of [speed, time of "
        "day] per sensor, edges as [from, to] pairs, numeric weights"
    )
    tp = obj["time_periods"]
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise bad_input(p, f"time_periods is {tp!r}, not a positive integer", fix)
    t = tp
    absent = [str(k) for k in range(min(t, len(obj) + 5)) if str(k) not in obj]
    if absent or t > len(obj):
        raise bad_input(
            p,
            f"time_periods={t} but steps {absent[:5] or [str(len(obj))]} are absent",
            "use a complete file",
        )
    try:  # ragged lists, strings where numbers belong, edges that are not pairs
        frames = np.asarray([obj[str(k)] for k in range(t)], dtype=np.float64)  # [T, N, 2]
        edges = np.asarray(obj["edges"], dtype=np.int64)
        weights = np.asarray(obj["weights"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as e:
        raise bad_input(p, f"malformed content ({type(e).__name__}: {e})", fix) from None
    if frames.ndim != 3 or frames.shape[2] < 2 or frames.shape[1] == 0:
        raise bad_input(
            p,
            f"steps have shape {frames.shape[1:]}, expected [N, 2]",
            "each step must list [speed, time of day] per sensor",
        )
    if not np.isfinite(frames).all():
        raise bad_input(p, "steps hold NaN or infinite values", fix)
    n = frames.shape[1]
    if edges.size and (edges.ndim != 2 or edges.shape[1] != 2):
        raise bad_input(p, f"edges have shape {edges.shape}, expected [E, 2] pairs", fix)
    edges = edges.reshape(-1, 2)
    if len(edges) != len(weights) or (edges.size and (edges.min() < 0 or edges.max() >= n)):
        raise bad_input(
            p,
            f"{len(edges)} edges / {len(weights)} weights, node ids must be in [0, {n})",
            "use a consistent edges/weights pair",
        )
    adj = np.zeros((n, n), dtype=np.float64)
    adj[edges[:, 0], edges[:, 1]] = weights
    adj = check_adjacency(adj, p, n)
    ids = _json_ids(p, n)
    ts, interval = timestamps_from_tod(frames[:, 0, 1], start, p)
    speed, mask = series_from_values(frames[:, :, 0], p, missing_value, columns=ids)
    loc = (
        None
        if locations_path is None
        else load_locations(
            require_file(locations_path, "sensor locations", "dataset.locations"), ids
        )
    )
    return SensorData(name, speed, mask, ts, interval, ids, adj, loc, str(p))
