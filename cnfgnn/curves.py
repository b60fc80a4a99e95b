"""Curves of a run for TensorBoard (``logger=tensorboard``), from each round's record.

``metrics.jsonl`` stays the source of truth: :class:`~cnfgnn.results.RunWriter` hands the
very record it appends there to :meth:`TensorBoardCurves.write`. Tags (step = round):

* ``loss/<key>``: ``train_loss``, ``split_loss``, ``val_loss``;
* ``val/<metric>``: ``val_rmse``, ``val_mae``, ``val_masked_mae``;
* ``seconds/<phase>`` and ``seconds/round``: wall seconds per phase of that round;
* ``bytes/<phase>/<direction>``: payload bytes so far, per phase and direction;
* any other numeric field, its dotted path with ``/`` (``failures``, ``step``, ...).

Needs the ``tensorboard`` package (``pip install 'cnfgnn[tensorboard]'``).
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Any

_SKIP = ("round",)


def tags(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one round's record, by tag (see the module docstring)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif (
            isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
        ):
            out[prefix] = float(value)

    for key, value in record.items():
        if key in _SKIP:
            continue
        if key.endswith("_loss"):
            walk(f"loss/{key}", value)
        elif key.startswith("val_"):
            walk(f"val/{key[len('val_') :]}", value)
        elif key == "seconds_round":
            walk("seconds/round", value)
        else:
            walk(key, value)
    return out


class TensorBoardCurves:
    """Writes each round's scalars to an event file under ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is an optional dependency
            raise ImportError(
                "logger=tensorboard needs the tensorboard package. Fix: "
                "pip install 'cnfgnn[tensorboard]' (or logger=none)"
            ) from exc
        self.dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.dir))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("round", 0))
        for tag, value in tags(record).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_curves(cfg: Any, run_dir: Path) -> TensorBoardCurves | None:
    """The curve logger ``cfg.logger`` asks for (None for ``logger=none`` or no group)."""
    lg = cfg.get("logger") if hasattr(cfg, "get") else None
    name = str(lg.get("name", "none")) if lg is not None else "none"
    if name == "none":
        return None
    if name == "tensorboard":
        return TensorBoardCurves(run_dir / str(lg.get("dir", "tensorboard")))
    raise ValueError(f"logger={name!r} is unknown: use logger=none or logger=tensorboard")
