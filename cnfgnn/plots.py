"""Plots of a run, made from its output files only (never from live objects).

``python -m cnfgnn.plots <run dir> [<run dir> ...]`` writes PNGs into each run's
``plots/``: validation loss per round, bytes per round by phase, test error per horizon,
and test RMSE per sensor on a map (longitude/latitude when the run's dataset has them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _rounds(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return (
        [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    )


def plot_validation(run: Path) -> Path | None:
    """Validation loss (scaled MSE) and RMSE against rounds."""
    rounds = _rounds(run)
    if not rounds:
        return None
    r = [x["round"] for x in rounds]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(r, [x["val_loss"] for x in rounds], marker="o", label="validation")
    if all("train_loss" in x for x in rounds):
        ax[0].plot(r, [x["train_loss"] for x in rounds], marker=".", label="local training")
    ax[0].set(xlabel="round", ylabel="MSE (scaled)", title="Loss per round")
    ax[0].legend()
    ax[1].plot(r, [x["val_rmse"] for x in rounds], marker="o", color="C2")
    ax[1].set(xlabel="round", ylabel="RMSE (original units, unmasked)", title="Validation RMSE")
    for a in ax:
        a.grid(alpha=0.3)
    return save(fig, run / "plots" / "validation.png")


def plot_bytes(run: Path) -> Path | None:
    """Bytes communicated in each round, stacked by phase (both directions)."""
    rounds = _rounds(run)
    if not rounds or "bytes" not in rounds[0]:
        return None
    phases = sorted({p for x in rounds for p in x["bytes"]})
    cum = {
        p: np.array([sum(x["bytes"].get(p, {}).values()) for x in rounds], float) for p in phases
    }
    per_round = {p: np.diff(np.concatenate([[0.0], v])) for p, v in cum.items()}
    r = np.array([x["round"] for x in rounds])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bottom = np.zeros(len(r))
    for p in phases:
        if per_round[p].sum() <= 0:
            continue
        ax.bar(r, per_round[p] / 1e6, bottom=bottom, label=p)
        bottom += per_round[p] / 1e6
    ax.set(xlabel="round", ylabel="MB", title="Bytes communicated per round, by phase")
    if bottom.sum() > 0:
        ax.legend(fontsize=8)
    else:  # centralised and local baselines communicate nothing during training
        ax.text(
            0.5,
            0.5,
            "no communication during training",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
    ax.grid(alpha=0.3, axis="y")
    return save(fig, run / "plots" / "bytes_per_round.png")


def horizon_axis(steps: int, interval_minutes: float | None) -> tuple[np.ndarray, str]:
    """x values and label of a per-horizon plot: minutes ahead when the data's step length
    is known, else steps ahead."""
    h = np.arange(1, steps + 1)
    if interval_minutes is None:
        return h, "horizon (steps)"
    return h * float(interval_minutes), "horizon (minutes)"


def plot_horizons(
    curves: list[tuple[str, dict]], out: Path, interval_minutes: float | None = None
) -> Path | None:
    """Masked MAE and unmasked RMSE per horizon step, a line per ``(label, final.json
    content)``; minutes of each run's own step length (``final["interval_minutes"]``), else
    ``interval_minutes``, else steps. None when no run has per-horizon metrics."""
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for label, final in curves:
        ph = final.get("test_per_horizon")
        if not ph:
            continue
        x, xlabel = horizon_axis(len(ph["rmse"]), final.get("interval_minutes", interval_minutes))
        ax[0].plot(x, ph["masked_mae"], marker="o", ms=3, label=label)
        ax[1].plot(x, ph["rmse"], marker="o", ms=3, label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax[0].set(xlabel=xlabel, ylabel="masked MAE", title="Test error per horizon (field's protocol)")
    ax[1].set(
        xlabel=xlabel, ylabel="RMSE (unmasked)", title="Test error per horizon (paper's protocol)"
    )
    for a in ax:
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    return save(fig, out)


def plot_sensor_map(run: Path, locations: np.ndarray | None = None) -> Path | None:
    """Test RMSE per sensor, placed by longitude/latitude (or index when none)."""
    final = run / "final.json"
    if not final.exists():
        return None
    per_node = json.loads(final.read_text()).get("test_rmse_per_node")
    if not per_node:
        return None
    values = np.array(list(per_node.values()), float)
    if locations is None or len(locations) != len(values):
        side = int(np.ceil(np.sqrt(len(values))))
        xy = np.stack([np.arange(len(values)) % side, np.arange(len(values)) // side], 1)
        xlabel, ylabel = "sensor (column)", "sensor (row)"
    else:
        xy = np.asarray(locations)[:, ::-1]  # (lon, lat)
        xlabel, ylabel = "longitude", "latitude"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    sc = ax.scatter(
        xy[:, 0], xy[:, 1], c=values, cmap="viridis", s=40, edgecolors="k", linewidths=0.3
    )
    fig.colorbar(sc, ax=ax, label="test RMSE (unmasked)")
    ax.set(xlabel=xlabel, ylabel=ylabel, title="Test RMSE per sensor")
    return save(fig, run / "plots" / "sensor_rmse_map.png")


def plot_run(
    run: str | Path, locations: np.ndarray | None = None, interval_minutes: float | None = None
) -> list[Path]:
    """Every single-run plot; returns the files written. ``interval_minutes``: the data's
    step length (horizons in minutes)."""
    run = Path(run)
    (run / "plots").mkdir(exist_ok=True)
    out = [
        plot_validation(run),
        plot_bytes(run),
        plot_horizons(_run_curve(run), run / "plots" / "horizons.png", interval_minutes),
        plot_sensor_map(run, locations),
    ]
    return [p for p in out if p is not None]


def _run_curve(run: Path) -> list[tuple[str, dict]]:
    """``[(method, final.json content)]`` of a run directory, or ``[]`` before its test."""
    final = run / "final.json"
    if not final.exists():
        return []
    data = json.loads(final.read_text())
    return [(data.get("method", run.parent.name), data)]


def save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (folders made) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for p in plot_run(arg):
            print(p)
