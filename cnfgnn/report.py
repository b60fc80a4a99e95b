"""``cnfgnn-report``: one table and the comparison plots from finished runs.

Usage::

    cnfgnn-report outputs/compare/synthetic_20261129-031500      # a cnfgnn-compare directory
    cnfgnn-report outputs/a/<run> outputs/b/<run> out=report_dir   # any runs
    cnfgnn-report outputs/multirun/20261129-040000                 # a Hydra sweep

Each argument is a run directory (it has ``final.json``) or a directory searched two levels
deep for runs (``cnfgnn-compare`` writes ``<out>/<method>/seed<k>/``). Writes into ``out``
(default: the single directory given, else ``./report``):

* ``comparison.csv``: a row per run (both metric protocols, seen/unseen nodes of inductive
  runs, parameters on node and server, bytes, seconds, the paper's reported RMSE where one
  exists, and the run's ``seed``). When a method ran with several seeds (the same settings
  otherwise), every method also gets a mean row: ``seed`` empty, ``runs`` = how many seeds,
  each metric column the mean over seeds and ``<column>_std`` its sample standard deviation.
* ``comparison.md``: the same as a table, ``mean ± std`` per method when there are seeds.
* ``plots/``: forecasts against truth over a day (``forecasts.png``; read from the nodes' own
  files under ``<run>/node_store/`` when the nodes ran on this machine, or from
  ``predictions.npz`` where they were released to the server; a run whose forecasts stayed on
  remote sites gets a note instead), error per horizon
  (``horizons.png``), error per sensor on a map (``sensor_maps.png``), validation RMSE against
  local epochs (``validation.png``) and bytes by phase (``bytes.png``); with several seeds
  they show each method's run with its first seed.

Everything is read from the runs' output files; truth for the forecast plot is read from the
runs' dataset. Horizons are in minutes of the data's own step length (``final.json``).
A directory whose runs all failed is reported as such (exit status 1).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cnfgnn.data.loaders import graph_label  # noqa: E402
from cnfgnn.plots import plot_horizons, save  # noqa: E402
from cnfgnn.shell import UsageError  # noqa: E402
from cnfgnn.tables import mean_std  # noqa: E402

# Test RMSE (unmasked, all horizons) reported for the original method, by dataset and
# method family. METR-LA / PEMS-BAY: the paper's Table 2 as quoted by a secondary source
# (docs/method.md §8.1; model sizes of the baseline rows not stated there). Los-loop: the
# authors' code after 5 rounds, seed 42 (docs/design.md §8). Keys: (dataset name, '-' read as
# '_'; family).
REFERENCE_RMSE: dict[tuple[str, str], tuple[float, str]] = {
    ("metr_la", "central_gru"): (11.787, "paper Table 2 (secondary source)"),
    ("metr_la", "local"): (12.224, "paper Table 2 (secondary source)"),
    ("metr_la", "fedavg"): (12.058, "paper Table 2 (secondary source)"),
    ("metr_la", "cnfgnn"): (11.487, "paper Table 2"),
    ("pems_bay", "central_gru"): (4.172, "paper Table 2 (secondary source)"),
    ("pems_bay", "local"): (4.152, "paper Table 2 (secondary source)"),
    ("pems_bay", "fedavg"): (4.432, "paper Table 2 (secondary source)"),
    ("pems_bay", "cnfgnn"): (3.822, "paper Table 2"),
    ("los_loop", "central_gru"): (8.26, "authors' code, 5 rounds"),
    ("los_loop", "local"): (7.72, "authors' code, 5 rounds"),
    ("los_loop", "fedavg"): (8.78, "authors' code, 5 rounds"),
    ("los_loop", "cnfgnn"): (7.99, "authors' code, 5 rounds"),
}

#: Test metrics of a run (both protocols; seen/unseen nodes of inductive runs).
TEST_METRICS = [
    "rmse",
    "mae",
    "mae_h3",
    "mae_h6",
    "mae_h12",
    "masked_mae",
    "rmse_h3",
    "rmse_h6",
    "rmse_h12",
    "masked_rmse",
    "mape_h3",
    "mape_h6",
    "mape_h12",
    "masked_mape",
    "rmse_seen",
    "rmse_unseen",
    "masked_mae_seen",
    "masked_mae_unseen",
]
#: What a run cost.
COST_METRICS = ["bytes", "seconds", "peak_rss_mb", "local_epochs", "rounds_run", "best_round"]
#: Columns averaged over seeds (each gets a ``<column>_std`` column in the mean rows).
METRICS = TEST_METRICS + COST_METRICS
COLUMNS = [
    "method",
    "label",
    "dataset",
    "graph",
    "seed",
    "runs",
    *TEST_METRICS,
    "params_node",
    "params_server",
    *COST_METRICS,
    "interval_minutes",
    "reference_rmse",
    "reference",
    "run_dir",
] + [f"{m}_std" for m in METRICS]
#: Config keys that differ between the seeds of one setting (left out when grouping runs).
#: Also left out: how a run was executed, not what it computes (threads, progress, logging).
PER_RUN_KEYS = (
    "seed",
    "run_dir",
    "output_root",
    "name",
    "resume",
    "hydra",
    "threads",
    "progress",
    "logger",
    "log_every",
)


class ReportError(RuntimeError):
    """Nothing to report (no finished run); the message says why and what to look at."""


@dataclass
class Run:
    """One finished run, read from its directory."""

    path: Path
    final: dict[str, Any]
    cfg: DictConfig
    key: str  # short method key (the compare method name, or derived from the config)
    label: str
    record: dict[str, Any] = field(default_factory=dict)  # cnfgnn-compare's record (peak memory)

    @property
    def family(self) -> str:
        method = str(self.cfg.federation.method)
        if method == "central":
            return "central_gn" if self.cfg.model.graph_embedding else "central_gru"
        return method

    @property
    def epochs_per_round(self) -> int:
        return max(1, int(self.cfg.federation.local_epochs))

    @property
    def seed(self) -> int | None:
        return None if self.cfg.get("seed") is None else int(self.cfg.seed)

    @property
    def setting(self) -> str:
        """The run's settings without what differs between seeds (groups seeds together)."""
        plain = OmegaConf.to_container(self.cfg, resolve=False)
        assert isinstance(plain, dict)
        for k in PER_RUN_KEYS:
            plain.pop(k, None)
        return json.dumps([self.key, self.label, plain], sort_keys=True, default=str)


def describe(cfg: DictConfig, params_node: int) -> str:
    """A paper-style label for a run's method, from its config."""
    size = f"{round(params_node / 1000)}K"
    method = str(cfg.federation.method)
    if method == "central":
        return (
            "GRU + GN (centralized)" if cfg.model.graph_embedding else f"GRU (centralized, {size})"
        )
    return {
        "cnfgnn": "CNFGNN",
        "local": f"GRU (local, {size})",
        "fedavg": f"GRU ({size}) + FedAvg",
        "fmtl": f"GRU ({size}) + FMTL",
        "split_learning": "Split learning",
        "at_no_fedavg": "AT w/o FedAvg",
    }.get(method, method)


def _failed_runs(p: Path) -> str:
    """What a ``cnfgnn-compare`` directory says about its runs that did not finish."""
    manifest = p / "compare.json"
    if not manifest.exists():
        return ""
    records = json.loads(manifest.read_text()).get("runs", {})
    if not records:
        return ""
    failed = [f"{k} (exit {r.get('returncode')})" for k, r in records.items()]
    return (
        f": every one of its {len(records)} runs failed ({', '.join(failed[:8])}); "
        f"their logs: {p}/<method>/seed<k>/compare.log"
    )


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (with ``final.json``) in ``paths``, searched two levels deep; runs a
    comparison kept aside (``*.prev-*``, an earlier try) are left out."""
    runs: list[Path] = []
    for p in paths:
        if not p.exists():
            raise UsageError(f"{p} does not exist")
        if (p / "final.json").exists():
            runs.append(p)
            continue
        found = sorted(
            {
                f.parent
                for pat in ("*/final.json", "*/*/final.json")
                for f in p.glob(pat)
                if ".prev-" not in f.parent.relative_to(p).as_posix()
            }
        )
        if not found:
            raise UsageError(
                f"no finished run (final.json) in {p} or two levels below{_failed_runs(p)}"
            )
        runs.extend(found)
    return runs


def _manifest(path: Path) -> tuple[dict[str, Any], str]:
    """The ``compare.json`` of the comparison ``path`` belongs to, and the run's key in it."""
    for up in (path.parent, path.parent.parent):
        m = up / "compare.json"
        if m.exists():
            return json.loads(m.read_text()), path.relative_to(up).as_posix()
    return {}, ""


def load_run(path: Path) -> Run:
    """Read a finished run (``final.json``, ``config.yaml``, its comparison's record)."""
    final = json.loads((path / "final.json").read_text())
    cfg = OmegaConf.load(path / "config.yaml")
    manifest, rel = _manifest(path)
    record = manifest.get("runs", {}).get(rel) or manifest.get("methods", {}).get(rel) or {}
    key = str(record.get("method", rel)) if record else ""
    label = manifest.get("labels", {}).get(key) if record else None
    params = int(final.get("parameters", {}).get("node", 0))
    key = key or f"{final.get('method', cfg.federation.method)}"
    return Run(path, final, cfg, key, label or describe(cfg, params), record)


def row(run: Run) -> dict[str, Any]:
    """The table row of one run (metrics in original units; MAPE in percent)."""
    t, f = run.final["test"], run.final
    ref = REFERENCE_RMSE.get((str(run.cfg.dataset.name).replace("-", "_"), run.family))
    r: dict[str, Any] = {
        "method": run.key,
        "label": run.label,
        "dataset": str(run.cfg.dataset.name),
        "seed": run.seed,
        "runs": None,
        "graph": f.get("graph") or graph_label(run.cfg.dataset),
        "rmse": t["rmse"],
        "mae": t["mae"],
        "masked_mae": t["masked_mae"],
        "masked_rmse": t["masked_rmse"],
        "masked_mape": 100 * t["masked_mape"],
    }
    for part in ("seen", "unseen"):  # inductive runs: nodes trained on / held out
        m = f.get(f"test_{part}") or {}
        r[f"rmse_{part}"], r[f"masked_mae_{part}"] = m.get("rmse"), m.get("masked_mae")
    for h in (3, 6, 12):
        r[f"mae_h{h}"] = t.get(f"masked_mae_h{h}")
        r[f"rmse_h{h}"] = t.get(f"masked_rmse_h{h}")
        mape = t.get(f"masked_mape_h{h}")
        r[f"mape_h{h}"] = None if mape is None else 100 * mape
    params = f.get("parameters", {})
    r.update(
        params_node=params.get("node"),
        params_server=params.get("server"),
        bytes=f.get("bytes_total"),
        seconds=f.get("seconds_total"),
        peak_rss_mb=run.record.get("peak_rss_mb"),
        local_epochs=f.get("rounds_run", 0) * run.epochs_per_round,
        rounds_run=f.get("rounds_run"),
        best_round=f.get("best_round"),
        interval_minutes=f.get("interval_minutes"),
        reference_rmse=ref[0] if ref else None,
        reference=ref[1] if ref else None,
        run_dir=str(run.path),
    )
    return r


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _size(n: float | None, unit: str = "B") -> str:
    if n is None:
        return "–"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _group(runs: list[Run]) -> list[list[Run]]:
    """Runs of one method and setting (they differ only in seed), in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    return list(groups.values())


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for the seeds of a method: every metric column's mean and ``<column>_std``;
    ``seed`` left empty, ``runs`` = the number of seeds."""
    first = rows[0]
    r: dict[str, Any] = {
        k: first.get(k)
        for k in (
            "method",
            "label",
            "dataset",
            "graph",
            "params_node",
            "params_server",
            "interval_minutes",
            "reference_rmse",
            "reference",
        )
    }
    r.update(
        seed=None,
        runs=len(rows),
        run_dir=str(Path(first["run_dir"]).parent) if len(rows) > 1 else first["run_dir"],
    )
    for m in METRICS:
        r[m], r[f"{m}_std"] = mean_std([x.get(m) for x in rows])
    return r


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """The CSV rows: each method's per-seed rows, then (when any method has several seeds)
    its mean row."""
    groups = _group(runs)
    seeds = any(len(g) > 1 for g in groups)
    out: list[dict[str, Any]] = []
    for g in groups:
        per = [row(r) for r in g]
        out.extend(per)
        if seeds:
            out.append(mean_row(per))
    return out


def _cell(r: dict[str, Any], key: str, digits: int = 3) -> str:
    """``mean ± std`` in a mean row with a spread, else the value."""
    std = r.get(f"{key}_std")
    if std is None:
        return _fmt(r.get(key), digits)
    return f"{_fmt(r.get(key), digits)} ± {_fmt(std, digits)}"


def _horizon_head(rows: list[dict[str, Any]]) -> str:
    """Horizons 3 / 6 / 12 in minutes when all rows share one step length, else in steps."""
    steps = {r.get("interval_minutes") for r in rows}
    if len(steps) == 1 and None not in steps:
        step = float(steps.pop())
        return " / ".join(f"{h * step:g}" for h in (3, 6, 12)) + " min"
    return "h3 / h6 / h12"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table (sorted as given). Mean rows (``runs`` set) show
    ``mean ± std`` over seeds; an inductive run adds RMSE on its seen / unseen nodes."""
    when = _horizon_head(rows)
    seeds = any(r.get("runs") for r in rows)
    inductive = any(r.get("rmse_seen") is not None for r in rows)
    head = (
        f"| method | {'seeds | ' if seeds else ''}RMSE (paper) | MAE | MAE {when} "
        f"| RMSE {when} | MAPE % {when} "
        f"| {'RMSE seen / unseen | ' if inductive else ''}"
        "params node + server | bytes | seconds | epochs | reported RMSE |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ref = f"{r['reference_rmse']:.3f} ({r['reference']})" if r["reference_rmse"] else "–"
        seed = f"{r['runs']} seeds" if r.get("runs") else f"seed {_fmt(r.get('seed'))}"
        lines.append(
            f"| {r['label']} | {seed + ' | ' if seeds else ''}{_cell(r, 'rmse')} "
            f"| {_cell(r, 'mae')} "
            f"| {_cell(r, 'mae_h3')} / {_cell(r, 'mae_h6')} / {_cell(r, 'mae_h12')} "
            f"| {_cell(r, 'rmse_h3')} / {_cell(r, 'rmse_h6')} / {_cell(r, 'rmse_h12')} "
            f"| {_cell(r, 'mape_h3', 2)} / {_cell(r, 'mape_h6', 2)} / {_cell(r, 'mape_h12', 2)} "
            + (f"| {_cell(r, 'rmse_seen')} / {_cell(r, 'rmse_unseen')} " if inductive else "")
            + f"| {_size(r['params_node'], '')} + {_size(r['params_server'], '')} "
            f"| {_size(r['bytes'])} | {_fmt(r['seconds'], 1)} | {_fmt(r['local_epochs'], 1)} "
            f"| {ref} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plots
def plot_forecasts(
    runs: list[Run], out: Path, data: Any, horizons: tuple[int, ...] = (3, 12)
) -> Path | None:
    """Forecasts ``horizons`` steps ahead against the truth, a row per sensor, over the
    kept test period (``predictions.hours``), one line per method whose forecasts are
    reachable (:func:`cnfgnn.results.read_predictions`)."""
    from cnfgnn.results import read_predictions

    kept = [(r, p) for r in runs if (p := read_predictions(r.path)) is not None]
    if not kept:
        return None
    col = {s: i for i, s in enumerate(data.sensor_ids)}
    sensors = [str(s) for s in kept[0][1]["sensor_ids"]]
    fig, axes = plt.subplots(
        len(sensors),
        len(horizons),
        figsize=(6.5 * len(horizons), 2.6 * len(sensors)),
        squeeze=False,
        sharex=True,
    )
    for j, h in enumerate(horizons):
        for i, sensor in enumerate(sensors):
            ax = axes[i, j]
            first = True
            for run, npz in kept:
                ids = [str(s) for s in npz["sensor_ids"]]
                if sensor not in ids or h > npz["forecast"].shape[1]:
                    continue
                t = npz["t_index"] + h - 1  # time index the h-step forecast is for
                if first:
                    obs = data.mask[t, col[sensor]]
                    truth = np.where(obs, data.speed[t, col[sensor]], np.nan)
                    ax.plot(data.timestamps[t], truth, color="k", lw=1.6, label="observed")
                    first = False
                ax.plot(
                    data.timestamps[t],
                    npz["forecast"][:, h - 1, ids.index(sensor)],
                    lw=1.0,
                    label=run.label,
                )
            ax.set_title(f"sensor {sensor}: {h * data.interval_minutes:g} min ahead", fontsize=9)
            ax.set_ylabel("speed")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    for ax in axes[-1]:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return save(fig, out / "forecasts.png")


def plot_sensor_maps(runs: list[Run], out: Path, data: Any) -> Path | None:
    """Test RMSE per sensor, a panel per method on one colour scale (longitude/latitude,
    or a grid by sensor order when the dataset has no locations)."""
    per = [(r, r.final.get("test_rmse_per_node") or {}) for r in runs]
    per = [(r, p) for r, p in per if p]
    if not per:
        return None
    values = np.array(
        [[np.nan if p.get(s) is None else p[s] for s in data.sensor_ids] for _, p in per]
    )
    if data.locations is not None:
        xy, labels = data.locations[:, ::-1], ("longitude", "latitude")
    else:
        side = int(np.ceil(np.sqrt(len(data.sensor_ids))))
        idx = np.arange(len(data.sensor_ids))
        xy, labels = np.stack([idx % side, idx // side], 1), ("sensor (column)", "sensor (row)")
    lo, hi = np.nanpercentile(values, 2), np.nanpercentile(values, 98)
    cols = min(4, len(per))
    rows_ = int(np.ceil(len(per) / cols))
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.8 * rows_), squeeze=False)
    for k, (run, _) in enumerate(per):
        ax = axes[k // cols, k % cols]
        sc = ax.scatter(
            xy[:, 0],
            xy[:, 1],
            c=values[k],
            cmap="viridis",
            vmin=lo,
            vmax=hi,
            s=22,
            edgecolors="k",
            linewidths=0.2,
        )
        ax.set_title(f"{run.label}\nmean {np.nanmean(values[k]):.2f}", fontsize=9)
        ax.set(
            xlabel=labels[0] if k + cols >= len(per) else None,  # bottom panel of a column
            ylabel=labels[1] if k % cols == 0 else None,
        )
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.locator_params(nbins=4)
        ax.tick_params(labelsize=7)
    for k in range(len(per), rows_ * cols):
        axes[k // cols, k % cols].axis("off")
    fig.subplots_adjust(hspace=0.3)
    fig.colorbar(sc, ax=axes, label="test RMSE per sensor (unmasked)", shrink=0.8)
    fig.savefig(out / "sensor_maps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out / "sensor_maps.png"


def _metrics(run: Run) -> list[dict[str, Any]]:
    path = run.path / "metrics.jsonl"
    return (
        [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    )


def plot_validation(runs: list[Run], out: Path) -> Path | None:
    """Validation RMSE against local epochs per node (so different round lengths compare)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drawn = False
    for run in runs:
        recs = _metrics(run)
        if recs:
            ax.plot(
                [x["round"] * run.epochs_per_round for x in recs],
                [x["val_rmse"] for x in recs],
                marker="o",
                ms=3,
                label=run.label,
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(
        xlabel="local epochs per node",
        ylabel="validation RMSE (unmasked)",
        title="Validation error per round",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out / "validation.png")


ONE_OFF_PHASES = ("setup", "upload_raw", "test", "resume")  # once per run, not per round


def plot_bytes(runs: list[Run], out: Path) -> Path | None:
    """Bytes by phase (both directions): per training round (left; phases that recur every
    round) and once per run (right: set-up, raw-data upload of the centralised baselines,
    test), a stacked bar per method."""
    phases = sorted({p for r in runs for p in (r.final.get("bytes") or {})})
    if not phases:
        return None
    fig, axes = plt.subplots(
        1, 2, figsize=(12, 0.5 * len(runs) + 2.2), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    y = np.arange(len(runs))
    for ax, once in zip(axes, (False, True)):
        left = np.zeros(len(runs))
        for k, phase in enumerate(phases):
            if (phase in ONE_OFF_PHASES) != once:
                continue
            total = np.array(
                [sum((r.final.get("bytes") or {}).get(phase, {}).values()) for r in runs], float
            )
            rounds = np.array([max(1, int(r.final.get("rounds_run") or 1)) for r in runs], float)
            value = total if once else total / rounds
            if value.sum() == 0:
                continue
            ax.barh(y, value / 1e6, left=left, label=phase, color=f"C{k % 10}")
            left += value / 1e6
        for i, total in enumerate(left):
            ax.text(total, i, f" {_size(total * 1e6)}", va="center", fontsize=8)
        ax.set_xlim(0, max(left.max(), 1e-6) * 1.3)
        ax.set(
            xlabel="MB (upload + download)", title="once per run" if once else "per training round"
        )
        ax.grid(alpha=0.3, axis="x")
        if left.sum() > 0:
            ax.legend(fontsize=7, loc="best")
    axes[0].set_yticks(y, [r.label for r in runs], fontsize=8)
    fig.suptitle("Communication by phase")
    return save(fig, out / "bytes.png")


def forecast_notes(runs: list[Run]) -> list[str]:
    """Where each run's test forecasts are: released to the server (said so), or kept on
    nodes this machine cannot reach (no forecast plot for that run, said so)."""
    from cnfgnn.results import NODE_STORE, read_predictions

    notes = []
    for r in runs:
        pred = r.final.get("predictions") or {}
        if pred.get("released_to_server"):
            notes.append(
                f"Note: {r.label} ran with predictions.release=true: its nodes sent "
                f"their test forecasts of {len(pred.get('sensors', []))} sensors to the "
                "server (predictions.npz)."
            )
        elif pred and read_predictions(r.path) is None:
            notes.append(
                f"Note: forecast plot unavailable for {r.label}: its test forecasts "
                f"stayed on its nodes' own disks, not reachable here (no "
                f"{r.path / NODE_STORE}). Plot them on the sites, or rerun with "
                "predictions.release=true to send them to the server."
            )
    return notes


def _dataset(run: Run) -> Any:
    """The run's dataset (truth and locations for the plots), or None when it cannot be
    read here (moved files): the plots that need it are left out, with a note."""
    from cnfgnn.data.errors import DataError
    from cnfgnn.data.loaders import load_dataset

    try:
        return load_dataset(run.cfg.dataset, windows=False)
    except (DataError, OSError) as exc:
        print(
            f"cnfgnn-report: no forecast or sensor-map plot, the dataset of {run.path} "
            f"cannot be read ({exc})",
            file=sys.stderr,
        )
        return None


def write_report(run_dirs: list[Path], out: Path, note: str = "") -> tuple[str, list[Path]]:
    """Write the table and plots of ``run_dirs`` into ``out``; returns (markdown, files).
    ``note``: a sentence for the page's preamble (e.g. how the runs were timed).

    Raises:
        ReportError: when ``run_dirs`` is empty.
    """
    if not run_dirs:
        raise ReportError(f"no finished run to report in {out}")
    extra = f" {note}" if note else ""  # `note` is reused below for the seeds' sentence
    runs = [load_run(Path(p)) for p in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs)
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    groups = _group(runs)
    firsts = [g[0] for g in groups]  # the plots: each method's run with its first seed
    seeds = any(len(g) > 1 for g in groups)
    if seeds:
        means = [r for r in rows if r.get("runs")]
        table = (
            markdown(means) + "\n\nPer seed:\n\n" + markdown([r for r in rows if not r.get("runs")])
        )
        note = (
            "Mean ± sample standard deviation over the seeds of each method (per-seed rows "
            "below and in comparison.csv). Plots: each method's run with its first seed "
            f"({', '.join(f'{r.label} {r.seed}' for r in firsts)}). "
        )
    else:
        table, note = markdown(rows), ""
    table = table + "".join(f"\n\n{n}" for n in forecast_notes(runs))
    datasets = sorted({f"{r['dataset']} (graph {r['graph']})" for r in rows})
    (out / "comparison.md").write_text(
        f"# Comparison on {', '.join(datasets)}\n\nTest split. RMSE (paper) and MAE: unmasked, all "
        "horizons, original units; per-horizon columns: masked (zeros left out) at horizons "
        "3/6/12. Epochs: local epochs per node actually trained (early stopping may end a run "
        f"early). {note}{extra}\n\n{table}\n"
    )
    files = [out / "comparison.csv", out / "comparison.md"]
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    data = _dataset(firsts[0])  # truth and locations, read once (runs share it)
    same = [r for r in firsts if r.cfg.dataset == firsts[0].cfg.dataset]
    step = None if data is None else data.interval_minutes
    for path in (
        None if data is None else plot_forecasts(same, plots, data),
        plot_horizons([(r.label, r.final) for r in firsts], plots / "horizons.png", step),
        None if data is None else plot_sensor_maps(same, plots, data),
        plot_validation(firsts, plots),
        plot_bytes(firsts, plots),
    ):
        if path is not None:
            files.append(path)
    return table, files


#: ``key=value`` options of the command (every other argument is a path).
OWN_KEYS = ("out",)


def _run(args: list[str]) -> int:
    from cnfgnn.shell import UsageError, did_you_mean

    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    for a in args:
        key, eq, _ = a.partition("=")
        if eq and key not in OWN_KEYS and not Path(a).exists():
            raise UsageError(
                f"unknown option {a!r}.{did_you_mean(key, OWN_KEYS)} "
                f"Options: {', '.join(k + '=...' for k in OWN_KEYS)}; "
                "other arguments are run directories"
            )
    outs = [a[len("out=") :] for a in args if a.startswith("out=")]
    paths = [Path(a) for a in args if not a.startswith("out=")]
    runs = find_runs(paths)
    out = (
        Path(outs[-1])
        if outs
        else (
            paths[0]
            if len(paths) == 1 and not (paths[0] / "final.json").exists()
            else Path("report")
        )
    )
    table, files = write_report(runs, out)
    print(table)
    print()
    for f in files:
        print(f"  {f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry (exit 2 on bad input)."""
    from cnfgnn.shell import console

    return console("cnfgnn-report", __doc__, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
