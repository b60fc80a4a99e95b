"""``cnfgnn-robustness``: test error of trained runs with silent sensors and noisy inputs.

Usage::

    cnfgnn-robustness RUN [RUN ...] [out=DIR] [silence=0,0.1,0.2,0.3,0.4,0.5]
                      [noise=0,0.1,0.2,0.5] [repeats=3] [seed=0] [split=test] [stride=1]

Each ``RUN`` is a run directory (CNFGNN, FedAvg, central GRU, or GRU local: one line per
run in the plot). Defaults come from ``conf/robustness/default.yaml``. For every level the
whole ``split`` (every ``stride``-th window) is forecast by federated inference
(:class:`~cnfgnn.federation.inference.Forecaster`, in-process):

* ``silence=f``: ``round(f x N)`` sensors, drawn with a seeded RNG (nested across
  fractions; ``repeats`` draws per fraction), send nothing; the server forecasts them with
  the fallback of the run's model (global node model [+ GN over the answering neighbours],
  or each sensor's training mean for per-node models);
* ``noise=s``: every node adds Gaussian noise of std ``s x`` its sensor's training std to
  its observed inputs before encoding (seeded per sensor and time step).

Writes ``robustness.csv`` (one row per run, kind, level, repeat and sensor subset:
``all`` / ``silent`` / ``answering``, with the paper's RMSE -- unmasked, original units, all
horizons -- and masked MAE), ``robustness.json`` (the same averaged over repeats, the
silenced sensors of every draw, fallbacks, seconds) and ``robustness.png`` (RMSE against the
silenced fraction and against the noise level, one line per run). Bad input exits 2.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from cnfgnn import machine, paths
from cnfgnn.data.errors import bad_input
from cnfgnn.shell import did_you_mean

log = logging.getLogger(__name__)
OWN_KEYS = ("out", "silence", "noise", "repeats", "seed", "split", "stride")
SUBSETS = ("all", "silent", "answering")
#: Reference row per draw: the silenced sensors forecast by their training mean.
REFERENCE = "silent_hist_mean"


def defaults() -> dict[str, Any]:
    return dict(
        OmegaConf.to_container(OmegaConf.load(paths.conf_dir() / "robustness" / "default.yaml"))
    )


def parse(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """``(run paths, options)`` from ``RUN [RUN ...] key=value ...``."""
    runs = [a for a in argv if "=" not in a]
    opts = defaults()
    opts["out"] = None
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            continue
        if key not in OWN_KEYS:
            raise bad_input(
                f"argument {arg!r}",
                "unknown option" + did_you_mean(key, OWN_KEYS, inline=True),
                f"use one of {list(OWN_KEYS)}",
            )
        try:
            if key in ("silence", "noise"):
                opts[key] = [float(v) for v in value.split(",") if v.strip()]
            elif key in ("repeats", "seed", "stride"):
                opts[key] = int(value)
            else:
                opts[key] = value
        except ValueError:
            raise bad_input(
                f"argument {arg!r}",
                "not a number (list)",
                "e.g. silence=0,0.1,0.2 noise=0,0.5 repeats=3",
            ) from None
    if not runs:
        raise bad_input(
            "arguments",
            "no run directory given",
            "cnfgnn-robustness outputs/<name>/<run> [outputs/<other>/<run>] ...",
        )
    bad = [f for f in opts["silence"] if not 0.0 <= f < 1.0]
    if bad:
        raise bad_input(f"silence={bad}", "fractions must lie in [0, 1)", "e.g. silence=0,0.5")
    if any(s < 0 for s in opts["noise"]):
        raise bad_input(f"noise={opts['noise']}", "negative noise level", "e.g. noise=0,0.5")
    if opts["stride"] < 1:
        raise bad_input(
            f"stride={opts['stride']}",
            "must be a positive whole number",
            "stride=1 evaluates every window",
        )
    if opts["repeats"] < 1:
        raise bad_input(f"repeats={opts['repeats']}", "needs at least one draw", "repeats=1")
    if opts["split"] not in ("train", "val", "test"):
        raise bad_input(f"split={opts['split']}", "no such split", "use train, val or test")
    return runs, opts


def split_ends(cfg: Any, num_steps: int, split: str) -> np.ndarray:
    """``[W]`` last input step of every window of ``split`` (the run's windows)."""
    from cnfgnn.data.windows import split_starts

    d, s = cfg.dataset, cfg.dataset.split
    starts = split_starts(num_steps, d.in_steps, d.out_steps, s.train, s.val, s.test)
    return starts[split] + int(d.in_steps) - 1


def subset_errors(
    forecast: np.ndarray, data: Any, ends: np.ndarray, cols: np.ndarray
) -> dict[str, float]:
    """Paper RMSE (unmasked, all horizons) and masked MAE of ``forecast`` ``[W, H, N]`` over
    the sensors ``cols``; NaN for an empty subset."""
    import torch

    from cnfgnn.evaluation.metrics import error_sums, metrics_from_sums

    if len(cols) == 0:
        return {"rmse": float("nan"), "masked_mae": float("nan"), "sensors": 0}
    t = ends[:, None] + np.arange(1, forecast.shape[1] + 1)
    pred = torch.as_tensor(forecast[:, :, cols])
    target = torch.as_tensor(data.speed[t][:, :, cols])
    mask = torch.as_tensor(data.mask[t][:, :, cols])
    if not torch.isfinite(pred).all():
        raise ValueError("non-finite forecasts among the evaluated sensors")
    sums = {k: v.numpy() for k, v in error_sums(pred, target, mask, pred, target).items()}
    m = metrics_from_sums(sums)
    return {
        "rmse": float(m["rmse"]),
        "masked_mae": float(m["masked_mae"]),
        "sensors": int(len(cols)),
    }


def label(cfg: Any) -> str:
    """Legend name of a run: CNFGNN, GRU local, GRU + FedAvg, ..."""
    method = str(cfg.federation.method)
    names = {
        "cnfgnn": "CNFGNN",
        "local": "GRU local",
        "fedavg": "GRU + FedAvg",
        "central": "GRU + GN (central)" if cfg.model.graph_embedding else "GRU (central)",
    }
    return names.get(method, method)


def evaluate_run(path: str, opts: dict[str, Any], progress=log.info) -> tuple[list[dict], dict]:
    """Rows of one run (``kind, level, repeat, subset, rmse, masked_mae, sensors``) and
    its summary (silenced sensors per draw, fallback, seconds)."""
    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.device import resolve_device
    from cnfgnn.experiment import NODE_STORE, build_workers
    from cnfgnn.federation.engines import InProcessEngine
    from cnfgnn.federation.inference import Forecaster, choose_silent, load_trained
    from cnfgnn.federation.rounds import ServerGraph
    from cnfgnn.forecast import request as R

    t0 = time.perf_counter()
    run_dir, ckpt = R.locate_run(path)
    cfg, _ = R.run_config(run_dir, [], per_node_ok=True)
    trained = load_trained(ckpt, cfg, per_node_ok=True)
    data = load_dataset(cfg.dataset)
    R.check_network(data, trained, cfg, False, run_dir)
    machine.apply(cfg)  # threads (null = all cores), progress
    device = resolve_device(str(cfg.device))
    store = run_dir / NODE_STORE if trained.per_node else None  # the nodes' own disks
    workers = build_workers(cfg, data, device, store)
    graph = ServerGraph.from_data(data)
    fc = Forecaster(
        cfg,
        InProcessEngine(workers),
        graph,
        trained,
        device,
        progress=lambda s: None,
        clock=data.time_of_day(),
    )
    ends = split_ends(cfg, data.num_steps, opts["split"])[:: opts["stride"]]
    n, name = data.num_nodes, label(cfg)
    progress(
        f"{name}: {run_dir} (best round {trained.best_round}), {len(ends)} "
        f"{opts['split']} windows x {n} sensors, fallback {fc.fallback_name()}"
    )
    rows: list[dict] = []
    draws: dict[str, list[list[str]]] = {}
    every = np.arange(n)
    fc.setup()
    means = fc.hist_mean if fc.hist_mean is not None else fc.training_means()
    for f in opts["silence"]:
        for r in range(opts["repeats"] if f > 0 else 1):
            quiet = choose_silent(n, f, opts["seed"] + r)
            res = fc.forecast(ends, silent=quiet)
            draws.setdefault(f"{f:g}", []).append(res.silent_sensors)
            for sub, cols in zip(SUBSETS, (every, np.flatnonzero(quiet), np.flatnonzero(~quiet))):
                rows.append(
                    {
                        "method": name,
                        "run": str(run_dir),
                        "kind": "silence",
                        "level": f,
                        "repeat": r,
                        "subset": sub,
                        **subset_errors(res.forecast, data, ends, cols),
                    }
                )
            if quiet.any():  # reference: the same silenced sensors, training-mean forecast
                ref = np.broadcast_to(means.astype(np.float32), res.forecast.shape)
                rows.append(
                    {
                        "method": name,
                        "run": str(run_dir),
                        "kind": "silence",
                        "level": f,
                        "repeat": r,
                        "subset": REFERENCE,
                        **subset_errors(ref, data, ends, np.flatnonzero(quiet)),
                    }
                )
            sub = [
                x for x in rows if x["level"] == f and x["repeat"] == r and x["kind"] == "silence"
            ]
            progress(
                f"  silence {f:4.2f} draw {r}: RMSE all {sub[0]['rmse']:.3f}  "
                f"silent {sub[1]['rmse']:.3f}  answering {sub[2]['rmse']:.3f}"
            )
    for s in opts["noise"]:
        res = fc.forecast(ends, noise=s)
        rows.append(
            {
                "method": name,
                "run": str(run_dir),
                "kind": "noise",
                "level": s,
                "repeat": 0,
                "subset": "all",
                **subset_errors(res.forecast, data, ends, every),
            }
        )
        progress(f"  noise {s:4.2f}: RMSE {rows[-1]['rmse']:.3f}")
    summary = {
        "method": name,
        "run": str(run_dir),
        "federation_method": str(cfg.federation.method),
        "best_round": trained.best_round,
        "fallback": fc.fallback_name(),
        "windows": int(len(ends)),
        "sensors": n,
        "dataset": data.name,
        "silenced_sensors": draws,
        "seconds": time.perf_counter() - t0,
    }
    return rows, summary


def averaged(rows: list[dict]) -> pd.DataFrame:
    """Mean over repeats: one row per method, kind, level and subset."""
    frame = pd.DataFrame(rows)
    keys = ["method", "kind", "level", "subset"]
    return frame.groupby(keys, sort=False)[["rmse", "masked_mae", "sensors"]].mean().reset_index()


def plot(path: Path, table: pd.DataFrame, title: str) -> Path:
    """Two panels: RMSE vs silenced fraction (all sensors solid, silent ones dashed) and
    RMSE vs input noise; one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnfgnn.forecast.outputs import _save

    fig, (a, b) = plt.subplots(1, 2, figsize=(11.5, 4.3))
    for i, (method, part) in enumerate(table.groupby("method", sort=False)):
        c = f"C{i}"
        sil = part[part.kind == "silence"]
        for sub, style, lab in (
            ("all", "-o", "all sensors"),
            ("silent", "--s", "silenced sensors"),
            ("answering", ":^", "answering sensors"),
        ):
            d = sil[sil.subset == sub].dropna(subset=["rmse"])
            if len(d):
                a.plot(
                    100 * d.level, d.rmse, style, color=c, ms=5, lw=1.6, label=f"{method}: {lab}"
                )
        d = part[(part.kind == "noise") & (part.subset == "all")]
        if len(d):
            b.plot(d.level, d.rmse, "-o", color=c, ms=5, lw=1.6, label=method)
    a.set(
        xlabel="silenced sensors (%)",
        ylabel="test RMSE (mph, unmasked, all horizons)",
        title="Silent sensors (forecast by the fallback)",
    )
    b.set(
        xlabel="input noise std (x sensor's training std)",
        ylabel="test RMSE (mph)",
        title="Gaussian noise on every node's inputs",
    )
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=7.5, loc="best", ncol=1)
    b.legend(fontsize=8.5, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def run(argv: Sequence[str], progress=log.info) -> dict[str, Any]:
    """Do what the command line asks; returns the JSON summary written."""
    from cnfgnn.forecast.outputs import write_csv, write_json

    t0 = time.perf_counter()
    runs, opts = parse(argv)
    rows, summaries = [], []
    for path in runs:
        r, s = evaluate_run(path, opts, progress)
        rows += r
        summaries.append(s)
    out = Path(opts["out"] or Path(runs[0]) / "robustness")
    table = averaged(rows)
    dataset = summaries[0]["dataset"]
    files = [
        write_csv(out / "robustness.csv", pd.DataFrame(rows)),
        plot(
            out / "robustness.png",
            table,
            f"{dataset}: robustness on the {opts['split']} split "
            f"({', '.join(s['method'] for s in summaries)}; "
            f"silenced draws per fraction: {opts['repeats']})",
        ),
    ]
    summary = {
        "options": {k: v for k, v in opts.items() if k != "out"},
        "runs": summaries,
        "mean_over_repeats": table.to_dict(orient="records"),
        "seconds": time.perf_counter() - t0,
        "dataset": dataset,
        "files": [str(f) for f in files] + [str(out / "robustness.json")],
    }
    write_json(out / "robustness.json", summary)
    return summary


def report(summary: dict[str, Any], progress=print) -> None:
    table = pd.DataFrame(summary["mean_over_repeats"])
    for method, part in table.groupby("method", sort=False):
        progress(f"{method}")
        sil = part[part.kind == "silence"].pivot(index="level", columns="subset", values="rmse")
        progress("  silenced  RMSE all / silent / answering / silent by training mean")
        for lvl, row in sil.iterrows():
            progress(
                f"  {100 * lvl:6.0f}%   {row.get('all', np.nan):7.3f} "
                f"{row.get('silent', np.nan):7.3f} {row.get('answering', np.nan):7.3f} "
                f"{row.get(REFERENCE, np.nan):7.3f}"
            )
        noi = part[part.kind == "noise"]
        progress("  noise     RMSE   masked MAE")
        for _, row in noi.iterrows():
            progress(f"  {row.level:6.2f}   {row.rmse:7.3f} {row.masked_mae:7.3f}")
    progress(f"{summary['seconds']:.1f} s")
    for f in summary["files"]:
        progress(f"wrote {f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry; exit status 2 on bad input."""
    from cnfgnn.shell import console

    return console("cnfgnn-robustness", __doc__, lambda args: report(run(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
