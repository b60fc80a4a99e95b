"""The only writer of run outputs (docs/design.md §7).

``outputs/<name>/<timestamp>_<seed>/`` holds ``config.yaml`` (resolved), ``metrics.jsonl``
(one line per round), ``final.json`` (test metrics and totals), ``checkpoint.pt`` (all
that is needed to resume) and ``plots/``. Files are written atomically (temp file +
rename), so a crash never leaves a half-written checkpoint or summary behind.

The nodes' own outputs (per-node models, the test forecasts kept for plots) go to each
node's own disk, its *store*; when every node runs on this machine (in-process engine,
Flower simulation) that is ``<run>/node_store/``. ``predictions.npz`` in the run directory
exists only where forecasts reached the server: the centralised baselines and runs with
``predictions.release=true``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cnfgnn import logs
from cnfgnn.curves import open_curves

#: Folder of a run directory standing in for the nodes' own disks (one machine).
NODE_STORE = "node_store"
#: Folder of a node's store holding its test forecasts, one file per sensor.
NODE_FORECASTS = "forecasts"


def json_safe(value: Any) -> Any:
    """JSON-safe values: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write(path: Path, write) -> Path:
    """Write ``path`` through a temporary file in its directory and one rename, so a crash
    never leaves a half-written file; ``write(tmp_path)`` does the writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class RunWriter:
    """Creates (or reopens, to resume) a run directory and writes its files.

    Args:
        cfg: the resolved config (dumped to ``config.yaml``).
        run_dir: an existing directory to continue; otherwise a new one is made under
            ``cfg.output_root/cfg.name``.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path | None = None):
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = Path(cfg.output_root) / str(cfg.name)
            run_dir = base / f"{stamp}_{cfg.seed}"
            n = 1
            while run_dir.exists():
                run_dir = base / f"{stamp}_{cfg.seed}_{n}"
                n += 1
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "plots").mkdir(exist_ok=True)
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(self.dir / "config.yaml", lambda p: p.write_text(text))
        from cnfgnn.data.loaders import graph_label

        self.graph = graph_label(cfg.dataset) if "dataset" in cfg else None
        logs.attach_run_log(self.dir)  # the run's full log: <run_dir>/run.log
        self.cfg = cfg
        self.curves: Any = None  # logger=tensorboard: opened at the first round

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    def log_round(self, record: dict[str, Any]) -> None:
        """Append one round's record to ``metrics.jsonl``."""
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
            f.flush()
        if self.curves is None:
            self.curves = open_curves(self.cfg, self.dir) or False
        if self.curves:  # the same record, as curves (logger=tensorboard)
            self.curves.write(json_safe(record))

    def truncate_rounds(self, last_round: int) -> None:
        """Drop records after ``last_round`` (a resumed run rewrites them)."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("round", 0) <= last_round
        ]
        atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in keep)))

    def rounds(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def write_final(self, final: dict[str, Any]) -> Path:
        path = self.dir / "final.json"
        if self.graph is not None:  # which road graph the numbers come from (tables say it)
            final.setdefault("graph", self.graph)
        text = json.dumps(json_safe(final), indent=2)
        atomic_write(path, lambda p: p.write_text(text))
        return path

    def write_predictions(
        self, sensor_ids: np.ndarray, t_index: np.ndarray, forecast: np.ndarray
    ) -> Path:
        """``predictions.npz``: test forecasts of a few sensors (for plots).

        Keys: ``sensor_ids`` ``[S]``, ``t_index`` ``[W]`` time index of each window's first
        forecast step, ``forecast`` ``[W, H, S]`` in original units.
        """
        path = self.dir / "predictions.npz"

        def write(p: Path) -> None:
            with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(
                    f,
                    sensor_ids=np.asarray(sensor_ids, dtype=str),
                    t_index=t_index,
                    forecast=forecast,
                )

        atomic_write(path, write)
        return path

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.checkpoint_path, lambda p: torch.save(state, p))

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------- forecasts kept for plots
def forecasts_released(cfg: Any) -> bool:
    """Whether the nodes send their test forecasts to the server (``predictions.release``;
    False by default and for configs written before the key existed)."""
    pred = cfg.get("predictions") if hasattr(cfg, "get") else None
    return bool(pred is not None and pred.get("release", False))


def safe_name(sensor_id: str) -> str:
    """A sensor id as a file name (anything but letters, digits, ``_.-`` becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(sensor_id))


def node_forecast_path(store: str | Path, sensor_id: str) -> Path:
    """``<store>/forecasts/<sensor>.npz``: one sensor's test forecasts on its node's disk."""
    return Path(store) / NODE_FORECASTS / f"{safe_name(sensor_id)}.npz"


def write_node_forecast(
    store: str | Path, sensor_id: str, split: str, t_index: np.ndarray, forecast: np.ndarray
) -> Path:
    """Written by a node, on its own disk: one sensor's forecasts of some windows of a split.

    Keys: ``sensor_id``, ``split``, ``t_index`` ``[W]`` time index of each window's first
    forecast step, ``forecast`` ``[W, H]`` in original units.
    """

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(
                f,
                sensor_id=np.asarray(str(sensor_id)),
                split=np.asarray(split),
                t_index=np.asarray(t_index, np.int64),
                forecast=np.asarray(forecast, np.float32),
            )

    return atomic_write(node_forecast_path(store, sensor_id), write)


def read_predictions(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """A run's test forecasts for plots, wherever they were kept; None when unreachable.

    ``predictions.npz`` when the forecasts reached the server; otherwise the nodes' own
    files under ``<run>/node_store/forecasts/`` (reachable when the nodes ran on this
    machine) for the sensors ``final.json`` lists. Returns ``sensor_ids`` ``[S]``,
    ``t_index`` ``[W]`` and ``forecast`` ``[W, H, S]`` (original units), as ``predictions.npz``.
    """
    run_dir = Path(run_dir)
    path = run_dir / "predictions.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in ("sensor_ids", "t_index", "forecast")}
    final_path = run_dir / "final.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else {}
    asked = (final.get("predictions") or {}).get("sensors")
    store = run_dir / NODE_STORE
    if asked is None:  # no final.json (yet): every sensor the nodes kept
        asked = []
        for f in sorted((store / NODE_FORECASTS).glob("*.npz")):
            with np.load(f) as z:
                asked.append(str(z["sensor_id"]))
    ids, t_index, cols = [], None, []
    for sid in asked:
        f = node_forecast_path(store, sid)
        if not f.exists():
            continue
        with np.load(f) as z:
            if t_index is None:
                t_index = z["t_index"]
            elif not np.array_equal(z["t_index"], t_index):
                raise ValueError(
                    f"{f}: forecast windows differ from the other sensors' "
                    f"in {store / NODE_FORECASTS}; rerun the test phase"
                )
            ids.append(str(sid))
            cols.append(z["forecast"])
    if not cols:
        return None
    return {
        "sensor_ids": np.asarray(ids, dtype=str),
        "t_index": t_index,
        "forecast": np.stack(cols, axis=-1),
    }


def finish_run(
    final: dict[str, Any],
    writer: RunWriter,
    locations: np.ndarray | None,
    interval_minutes: float | None,
    engine: str,
    method: str,
) -> dict[str, Any]:
    """The end of every run, whatever ran it: name the method and engine, record the data's
    step length, draw the run's plots, write ``final.json``; returns ``final``."""
    from cnfgnn.plots import plot_run  # matplotlib only where a run ends

    final["method"] = method
    final["engine"] = engine
    final["interval_minutes"] = interval_minutes  # the data's step length
    final["plots"] = [str(p) for p in plot_run(writer.dir, locations, interval_minutes)]
    writer.write_final(final)
    return final
