"""The only writer of run outputs (DESIGN.md §7).

``outputs/<name>/<timestamp>_<seed>/`` holds ``config.yaml`` (resolved), ``metrics.jsonl``
(one line per round), ``final.json`` (test metrics and totals), ``checkpoint.pt`` (all
that is needed to resume) and ``plots/``. Files are written atomically (temp file +
rename), so a crash never leaves a half-written checkpoint or summary behind.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cnfgnn import logs
from cnfgnn.curves import open_curves


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
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("round", 0) <= last_round]
        atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in keep)))

    def rounds(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def write_final(self, final: dict[str, Any]) -> Path:
        path = self.dir / "final.json"
        text = json.dumps(json_safe(final), indent=2)
        atomic_write(path, lambda p: p.write_text(text))
        return path

    def write_predictions(self, sensor_ids: np.ndarray, t_index: np.ndarray,
                          forecast: np.ndarray) -> Path:
        """``predictions.npz``: test forecasts of a few sensors (for plots).

        Keys: ``sensor_ids`` ``[S]``, ``t_index`` ``[W]`` time index of each window's first
        forecast step, ``forecast`` ``[W, H, S]`` in original units.
        """
        path = self.dir / "predictions.npz"
        def write(p: Path) -> None:
            with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, sensor_ids=np.asarray(sensor_ids, dtype=str), t_index=t_index,
                         forecast=forecast)

        atomic_write(path, write)
        return path

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.checkpoint_path, lambda p: torch.save(state, p))

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
