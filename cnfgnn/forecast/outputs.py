"""Forecast outputs: tidy CSV, JSON summaries, errors per horizon, and their plots.

Everything here reads a :class:`~cnfgnn.federation.inference.ForecastResult` (forecasts
``[W, H, N]`` in original units) and the dataset the CLI loaded locally; the truth
(``observed``) comes from that dataset, never from the nodes.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cnfgnn.data.dataset import SensorData  # noqa: E402
from cnfgnn.evaluation.metrics import error_sums, metrics_from_sums, per_horizon  # noqa: E402
from cnfgnn.federation.inference import ForecastResult  # noqa: E402
from cnfgnn.results import atomic_write, json_safe  # noqa: E402

COLUMNS = ("sensor_id", "timestamp", "horizon", "forecast", "observed")


def write_json(path: Path, content: dict[str, Any]) -> Path:
    text = json.dumps(json_safe(content), indent=2)
    return atomic_write(path, lambda p: p.write_text(text))


def truth(data: SensorData, ends: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Observed values and their mask ``[W, H, N]`` for the targets of windows ending at
    ``ends`` (False where the target is past the data or was not observed)."""
    t = np.asarray(ends)[:, None] + np.arange(1, horizon + 1)  # [W, H]
    inside = t < data.num_steps
    tc = np.minimum(t, data.num_steps - 1)
    mask = data.mask[tc] & inside[..., None]
    return np.where(mask, data.speed[tc], np.nan).astype(np.float32), mask


def tidy(
    result: ForecastResult, data: SensorData, window: int = 0, issued: bool = False
) -> pd.DataFrame:
    """One row per forecast sensor (answered or silenced) and horizon step of one window
    (``COLUMNS``)."""
    end = int(result.ends[window])
    horizon = result.forecast.shape[1]
    obs, _ = truth(data, result.ends[window : window + 1], horizon)
    step = pd.Timedelta(minutes=data.interval_minutes)
    times = data.timestamps[end] + step * np.arange(1, horizon + 1)
    keep = np.flatnonzero(result.forecast_mask)
    frame = pd.DataFrame(
        {
            "sensor_id": np.repeat(np.asarray(result.sensor_ids, dtype=object)[keep], horizon),
            "timestamp": np.tile(times, len(keep)),
            "horizon": np.tile(np.arange(1, horizon + 1), len(keep)),
            "forecast": result.forecast[window][:, keep].T.reshape(-1),
            "observed": obs[0][:, keep].T.reshape(-1),
        }
    )
    if issued:
        frame.insert(0, "issued_at", data.timestamps[end])
    return frame


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    return atomic_write(
        path,
        lambda p: frame.to_csv(
            p, index=False, float_format="%.4f", date_format="%Y-%m-%d %H:%M:%S"
        ),
    )


def rolling_errors(result: ForecastResult, data: SensorData) -> tuple[dict, pd.DataFrame]:
    """Errors of a rolling period over the forecast sensors (answered, and silenced ones
    forecast by the fallback): (summary metrics, per horizon).

    Both protocols from one set of sums (:mod:`cnfgnn.evaluation.metrics`): masked
    MAE/RMSE/MAPE (missing readings left out) and the paper's unmasked RMSE/MAE.
    """
    keep = np.flatnonzero(result.forecast_mask)
    horizon = result.forecast.shape[1]
    t = result.ends[:, None] + np.arange(1, horizon + 1)
    pred = torch.as_tensor(result.forecast[:, :, keep])
    target = torch.as_tensor(data.speed[t][:, :, keep])
    mask = torch.as_tensor(data.mask[t][:, :, keep])
    sums = {k: v.numpy() for k, v in error_sums(pred, target, mask, pred, target).items()}
    metrics = {k: v for k, v in metrics_from_sums(sums).items() if k != "loss"}
    ph = per_horizon(sums)
    table = pd.DataFrame(
        {
            "horizon": np.arange(1, horizon + 1),
            "minutes": np.arange(1, horizon + 1) * data.interval_minutes,
            "masked_mae": ph["masked_mae"],
            "masked_rmse": ph["masked_rmse"],
            "masked_mape": ph["masked_mape"],
            "mae": ph["mae"],
            "rmse": ph["rmse"],
            "count": sums["m_count"].sum(0).astype(np.int64),
        }
    )
    return metrics, table


# ---------------------------------------------------------------------- plots
def pick_sensors(
    result: ForecastResult,
    data: SensorData,
    count: int,
    wanted: list[str] | None = None,
    history: int = 36,
) -> list[int]:
    """Sensors to plot: ``wanted`` ids, else the ``count`` most eventful answered ones.

    Eventful: the largest spread (std) of the readings over the last ``history`` steps
    before a forecast, or over a rolling period.
    """
    index = {s: i for i, s in enumerate(result.sensor_ids)}
    if wanted:
        unknown = [s for s in wanted if s not in index]
        if unknown:
            from cnfgnn.data.errors import bad_input

            raise bad_input(
                f"sensors={','.join(wanted)}",
                f"unknown sensor ids {unknown[:5]}",
                f"use ids of this network, e.g. {result.sensor_ids[:3]}",
            )
        return [index[s] for s in wanted]
    if len(result.ends) == 1:
        t0, t1 = max(0, int(result.ends[0]) - history + 1), int(result.ends[0]) + 1
    else:
        t0, t1 = int(result.ends[0]) + 1, int(result.ends[-1]) + 1
    seen = np.where(data.mask[t0:t1], data.speed[t0:t1], np.nan)  # [T', N]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sensor without readings
        move = np.nan_to_num(np.nanstd(seen, axis=0), nan=-1.0)  # [N]
    move[~result.answered] = -np.inf
    order = np.argsort(-move, kind="stable")
    return [int(i) for i in order[: min(count, int(result.answered.sum()))]]


def _time_axis(ax: Any) -> None:
    loc = mdates.AutoDateLocator(minticks=3, maxticks=6)
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    ax.grid(alpha=0.3)


def plot_forecast(
    path: Path,
    result: ForecastResult,
    data: SensorData,
    sensors: list[int],
    history: int,
    in_steps: int,
) -> Path:
    """Forecasts of a few sensors with their recent history (inputs shaded)."""
    end = int(result.ends[0])
    horizon = result.forecast.shape[1]
    start = max(0, end - history + 1)
    obs, _ = truth(data, result.ends[:1], horizon)
    step = pd.Timedelta(minutes=data.interval_minutes)
    fut = data.timestamps[end] + step * np.arange(0, horizon + 1)
    cols = 2 if len(sensors) > 1 else 1
    rows = math.ceil(len(sensors) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.2 * cols, 3.3 * rows), squeeze=False, sharex=True
    )
    for ax, i in zip(axes.ravel(), sensors):
        past = np.where(data.mask[start : end + 1, i], data.speed[start : end + 1, i], np.nan)
        ax.plot(data.timestamps[start : end + 1], past, color="0.25", lw=1.4, label="history")
        ax.axvspan(
            data.timestamps[end - in_steps + 1],
            data.timestamps[end],
            color="C0",
            alpha=0.08,
            label=f"model input ({in_steps} steps)",
        )
        fc = np.concatenate([[past[-1]], result.forecast[0, :, i]])
        ax.plot(fut, fc, color="C3", lw=2, marker="o", ms=3, label="forecast")
        if np.isfinite(obs[0, :, i]).any():
            ax.plot(
                fut,
                np.concatenate([[past[-1]], obs[0, :, i]]),
                color="0.25",
                lw=1.4,
                ls="--",
                marker=".",
                label="observed",
            )
        ax.axvline(data.timestamps[end], color="0.5", lw=0.8)
        ax.set_title(f"sensor {result.sensor_ids[i]}", fontsize=10)
        ax.set_ylabel("speed (mph)")
        _time_axis(ax)
    for ax in axes.ravel()[len(sensors) :]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(
        f"{data.name}: {horizon}-step forecast issued at {data.timestamps[end]}", fontsize=11
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


def plot_rolling(
    path: Path, result: ForecastResult, data: SensorData, table: pd.DataFrame, sensors: list[int]
) -> Path:
    """Error per horizon over the period, and rolling forecasts of a few sensors."""
    horizon = result.forecast.shape[1]
    fig = plt.figure(figsize=(12, 3.3 * max(1, len(sensors))))
    grid = fig.add_gridspec(max(1, len(sensors)), 2, width_ratios=(1, 2.2))
    ax = fig.add_subplot(grid[:, 0])
    ax.plot(table["minutes"], table["masked_rmse"], marker="s", label="RMSE")
    ax.plot(table["minutes"], table["masked_mae"], marker="o", label="MAE")
    for x, y, m in zip(table["minutes"], table["masked_mae"], table["masked_mape"]):
        if x in (table["minutes"].iloc[0], 15, 30, 60):
            ax.annotate(
                f"{100 * m:.1f}%",
                (x, y),
                textcoords="offset points",
                xytext=(0, -13),
                ha="center",
                fontsize=7,
                color="C1",
            )
    ax.set(
        xlabel="horizon (minutes ahead)",
        ylabel="error (mph, masked)",
        title="Error per horizon (MAPE under MAE)",
    )
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    step = pd.Timedelta(minutes=data.interval_minutes)
    t0, t1 = int(result.ends[0]) + 1, int(result.ends[-1]) + horizon
    shown = sorted({min(3, horizon), horizon})
    for r, i in enumerate(sensors):
        a = fig.add_subplot(grid[r, 1])
        obs = np.where(data.mask[t0 : t1 + 1, i], data.speed[t0 : t1 + 1, i], np.nan)
        a.plot(data.timestamps[t0 : t1 + 1], obs, color="0.25", lw=1.2, label="observed")
        for h in shown:
            when = data.timestamps[result.ends] + step * h
            a.plot(
                when,
                result.forecast[:, h - 1, i],
                lw=1.2,
                label=f"{h * data.interval_minutes:g} min ahead",
            )
        a.set_title(f"sensor {result.sensor_ids[i]}", fontsize=10)
        a.set_ylabel("speed (mph)")
        a.legend(loc="lower left", fontsize=8, ncol=3)
        _time_axis(a)
    first, last = data.timestamps[result.ends[0]], data.timestamps[result.ends[-1]]
    fig.suptitle(
        f"{data.name}: rolling forecasts issued {first} .. {last} "
        f"({len(result.ends)} windows, {int(result.answered.sum())} sensors)",
        fontsize=11,
    )
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path
