"""Per-client data shards for a real deployment: each client directory holds only its nodes.

Layout written by :func:`write_shards`::

    out_dir/manifest.json              dataset name, T, interval, start, clients -> nodes + ids
    out_dir/client_0000/series.npz     speed [T, K], mask [T, K], node_indices [K],
                                       sensor_ids [K], timestamps [T] int64 ns, interval_minutes
    out_dir/server/graph.npz           adjacency [N, N], sensor_ids [N], locations [N, 2]

The server's shard has the graph and no series. Everything is written to a temporary sibling
directory first and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cnfgnn.data.dataset import NS_PER_DAY, SensorData
from cnfgnn.data.errors import DataError, bad_input, require_file
from cnfgnn.data.nodes import partition

MANIFEST = "manifest.json"
SERIES_FILE = "series.npz"
GRAPH_FILE = Path("server") / "graph.npz"


def client_dir_name(client: int) -> str:
    """``client_0007`` for client 7."""
    return f"client_{client:04d}"


@dataclass
class NodeShard:
    """One client's data: only its own nodes' series.

    Attributes:
        speed: ``[T, K]`` float32 (missing = 0).
        mask: ``[T, K]`` bool.
        node_indices: ``[K]`` int64 global node indices.
        sensor_ids: K ids.
        timestamps: length-T time axis.
        interval_minutes: step length.
    """

    speed: np.ndarray
    mask: np.ndarray
    node_indices: np.ndarray
    sensor_ids: list[str]
    timestamps: pd.DatetimeIndex
    interval_minutes: float

    def time_of_day(self) -> np.ndarray:
        """``[T]`` float32 fraction of the day."""
        ns = self.timestamps.asi8 - self.timestamps.normalize().asi8
        return (np.mod(ns, NS_PER_DAY) / NS_PER_DAY).astype(np.float32)


def write_shards(
    data: SensorData,
    out_dir: str | Path,
    nodes_per_client: int | str | None,
    nodes: np.ndarray | None = None,
) -> Path:
    """Write one directory per client plus the server's graph and a manifest.

    Args:
        data: the full dataset.
        out_dir: target directory (must not exist, or be empty).
        nodes_per_client: K, sensors per client (contiguous groups of ``nodes``); None:
            one client of all.
        nodes: node indices to shard, in client order (default: all, ascending).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise bad_input(
            out,
            "output exists and is not an empty directory",
            "choose a new out=DIR or remove the old shards first",
        )
    sel = np.arange(data.num_nodes) if nodes is None else np.asarray(nodes, dtype=np.int64)
    if (
        sel.size == 0
        or sel.min() < 0
        or sel.max() >= data.num_nodes
        or len(np.unique(sel)) != len(sel)
    ):
        raise bad_input(
            data.where,
            f"node indices must be unique and in [0, {data.num_nodes})",
            "pass valid node indices",
        )
    groups = partition(sel, nodes_per_client)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ts_ns = data.timestamps.asi8.astype(np.int64)
        clients = []
        for c, g in enumerate(groups):
            d = tmp / client_dir_name(c)
            d.mkdir()
            ids = [data.sensor_ids[i] for i in g]
            np.savez(
                d / SERIES_FILE,
                speed=data.speed[:, g],
                mask=data.mask[:, g],
                node_indices=g,
                sensor_ids=np.asarray(ids, dtype=str),
                timestamps=ts_ns,
                interval_minutes=np.float64(data.interval_minutes),
            )
            clients.append({"client": c, "dir": d.name, "nodes": g.tolist(), "sensor_ids": ids})
        (tmp / "server").mkdir()
        loc = data.locations if data.locations is not None else np.full((data.num_nodes, 2), np.nan)
        np.savez(
            tmp / GRAPH_FILE,
            adjacency=data.adjacency,
            sensor_ids=np.asarray(data.sensor_ids, dtype=str),
            locations=loc,
            has_locations=np.bool_(data.locations is not None),
        )
        manifest = {
            "dataset": data.name,
            "num_nodes": data.num_nodes,
            "num_steps": data.num_steps,
            "interval_minutes": data.interval_minutes,
            "start": str(data.timestamps[0]),
            "end": str(data.timestamps[-1]),
            "nodes_per_client": max(len(g) for g in groups),
            "num_clients": len(clients),
            "server": str(GRAPH_FILE),
            "clients": clients,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_manifest(out_dir: str | Path) -> dict:
    """The shard set's ``manifest.json``."""
    p = require_file(Path(out_dir) / MANIFEST, "shard manifest")
    return json.loads(p.read_text())


def load_shard(client_dir: str | Path) -> NodeShard:
    """Read one client's shard (only this directory is opened)."""
    p = require_file(Path(client_dir) / SERIES_FILE, "client shard")
    fix = "write the shards again with cnfgnn-data shard (or write_shards)"
    keys = ("speed", "mask", "node_indices", "sensor_ids", "timestamps", "interval_minutes")
    try:
        with np.load(p) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise bad_input(p, f"keys {missing} are missing (has {sorted(z.files)})", fix)
            arr = {k: z[k] for k in keys}
    except DataError:
        raise
    except Exception as e:  # not a zip, truncated, object arrays (pickles are refused)
        raise bad_input(p, f"not a readable npz ({type(e).__name__}: {e})", fix) from None
    speed, mask, nodes = arr["speed"], arr["mask"], arr["node_indices"]
    if speed.ndim != 2 or speed.dtype.kind not in "fiu" or speed.shape[1] == 0:
        raise bad_input(p, f"speed is {speed.dtype} {speed.shape}, not numbers [T, K]", fix)
    t, k = speed.shape
    if not np.isfinite(speed).all():
        raise bad_input(
            p, "speed holds NaN or infinite values (missing readings are 0 with mask False)", fix
        )
    if mask.shape != (t, k) or mask.dtype.kind not in "biu":
        raise bad_input(p, f"mask is {mask.dtype} {mask.shape}, not bool {(t, k)}", fix)
    if (
        nodes.shape != (k,)
        or nodes.dtype.kind not in "iu"
        or (nodes < 0).any()
        or len(np.unique(nodes)) != k
    ):
        raise bad_input(
            p,
            f"node_indices is {nodes.dtype} {nodes.shape}, not {k} distinct node indices >= 0",
            fix,
        )
    if arr["sensor_ids"].shape != (k,):
        raise bad_input(p, f"sensor_ids has shape {arr['sensor_ids'].shape}, not ({k},)", fix)
    ts, interval = arr["timestamps"], arr["interval_minutes"]
    if ts.shape != (t,) or ts.dtype.kind not in "iuM":
        raise bad_input(p, f"timestamps is {ts.dtype} {ts.shape}, not {t} int64 ns", fix)
    if (
        interval.shape != ()
        or interval.dtype.kind not in "fiu"
        or not (np.isfinite(interval) and interval > 0)
    ):
        raise bad_input(p, f"interval_minutes is {interval!r}, not a positive number", fix)
    return NodeShard(
        speed=speed.astype(np.float32),
        mask=mask.astype(bool),
        node_indices=nodes.astype(np.int64),
        sensor_ids=[str(s) for s in arr["sensor_ids"]],
        timestamps=pd.DatetimeIndex(ts.astype("datetime64[ns]")),
        interval_minutes=float(interval),
    )


def load_server_graph(out_dir: str | Path) -> dict[str, np.ndarray | list[str] | None]:
    """The server's shard: ``adjacency [N, N]``, ``sensor_ids``, ``locations [N, 2]`` or None."""
    p = require_file(Path(out_dir) / GRAPH_FILE, "server graph")
    with np.load(p) as z:
        return {
            "adjacency": z["adjacency"],
            "sensor_ids": [str(s) for s in z["sensor_ids"]],
            "locations": z["locations"] if bool(z["has_locations"]) else None,
        }
