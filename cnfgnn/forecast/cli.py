"""``cnfgnn-forecast``: forecasts from a trained run, by federated inference.

Usage::

    cnfgnn-forecast RUN [at=TIME] [out=DIR] [engine=inprocess|simulation|deployment]
                    [sensors=ID,ID,...] [plot_sensors=4] [history=36]
                    [dataset=NAME] [dataset.KEY=VALUE ...] [engine.KEY=VALUE ...]
                    [device=cpu] [threads=N] [federation.nodes_per_client=K]
    cnfgnn-forecast RUN rolling.start=TIME [rolling.end=TIME] [save_forecasts=true] ...

``RUN`` is a run directory (``outputs/<name>/<timestamp>_<seed>``) or its ``checkpoint.pt``.
A forecast reads the 12 steps ending at ``at`` (default: the data's last step) and writes
the next 12 for every sensor to ``<RUN>/forecast/`` (or ``out``):

* ``forecast_<time>.csv``: ``sensor_id, timestamp, horizon, forecast, observed`` (observed
  where the data already hold the truth; read here from the dataset, never from the nodes);
* ``forecast_<time>.png``: a few sensors (``sensors``, else the ``plot_sensors`` whose
  forecasts move most) with their last ``history`` steps;
* ``forecast_<time>.json``: sensors that did not answer, seconds and bytes per phase.

Rolling evaluation forecasts at every step from ``rolling.start`` to ``rolling.end``
(issue times; default one day) and writes ``rolling_<start>_<end>.{csv,json,png}``: masked
MAE/RMSE/MAPE and unmasked RMSE/MAE per horizon over that period (``save_forecasts=true``
also writes every forecast). Problems print ``source: problem. Fix: ...`` and exit 2.

``engine=deployment`` starts a SuperLink and one SuperNode per shard of the data
(``federation.nodes_per_client`` sensors each) on loopback, submits the request with
``flwr run`` and stops exactly those processes; logs in ``<out>/deployment/<stamp>/logs``.

Robustness (in-process only): ``silent=ID,ID,...`` makes those sensors send nothing (they
are forecast by the fallback of :mod:`cnfgnn.federation.inference` and listed in the JSON);
``noise=LEVEL`` adds Gaussian noise of std LEVEL x each sensor's training std to the
inputs on every node. Curves over many levels: ``cnfgnn-robustness``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnfgnn.data.errors import bad_input
from cnfgnn.shell import console  # the one shell of every command

OWN_KEYS = (
    "at",
    "out",
    "sensors",
    "plot_sensors",
    "history",
    "rolling.start",
    "rolling.end",
    "save_forecasts",
    "silent",
    "noise",
)
DEFAULTS = {"plot_sensors": "4", "history": "36", "save_forecasts": "false"}


def parse(argv: Sequence[str]) -> tuple[str, dict[str, str], list[str]]:
    """``(run path, own options, config overrides)`` from ``RUN key=value ...``."""
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise bad_input(
            "arguments",
            "the first one must be a run directory or a checkpoint",
            "cnfgnn-forecast outputs/<name>/<run> [at=TIME] ...",
        )
    own: dict[str, str] = dict(DEFAULTS)
    overrides: list[str] = []
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq:
            raise bad_input(
                f"argument {arg!r}",
                "options are key=value",
                "e.g. at='2012-03-07 08:00' or engine=simulation",
            )
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    if "at" in own and "rolling.start" in own:
        raise bad_input(
            "at / rolling.start",
            "a single forecast and a rolling evaluation were both asked for",
            "pass either at=TIME or rolling.start=TIME",
        )
    if "rolling.end" in own and "rolling.start" not in own:
        raise bad_input("rolling.end", "given without rolling.start", "add rolling.start=TIME")
    for key in ("plot_sensors", "history"):
        if not own[key].isdigit():
            raise bad_input(f"{key}={own[key]}", "not a whole number", f"e.g. {key}=4")
    if "noise" in own:
        try:
            ok = float(own["noise"]) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise bad_input(f"noise={own['noise']}", "not a non-negative number", "e.g. noise=0.2")
    return argv[0], own, overrides


def _stamp(ts) -> str:
    return f"{ts:%Y%m%d-%H%M}"


def run(argv: Sequence[str], progress=None, engine_wrapper=None) -> dict:
    """Do what the command line asks; returns the JSON summary written."""
    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.federation.inference import load_trained
    from cnfgnn.forecast import outputs as O
    from cnfgnn.forecast import request as R

    progress = progress or logging.getLogger(__name__).info
    t_start = time.perf_counter()
    path, own, overrides = parse(argv)
    run_dir, ckpt = R.locate_run(path)
    cfg, changed = R.run_config(run_dir, overrides)
    trained = load_trained(ckpt, cfg)
    data = load_dataset(cfg.dataset, windows=False)  # new data may hold just the latest steps
    R.check_network(data, trained, cfg, changed, run_dir)
    in_steps, out_steps = int(cfg.dataset.in_steps), int(cfg.dataset.out_steps)
    rolling = "rolling.start" in own
    if rolling:
        ends = R.rolling_ends(
            data, own["rolling.start"], own.get("rolling.end"), in_steps, out_steps
        )
    else:
        ends = np.asarray([R.step_index(data, own.get("at"), in_steps)], np.int64)
    out_dir = Path(own.get("out") or run_dir / "forecast")
    progress(
        f"{cfg.federation.method} run {run_dir} (best round {trained.best_round}): "
        f"{len(ends)} window(s) x {data.num_nodes} sensors, engine={cfg.engine.name}"
    )
    silent = [x for x in own.get("silent", "").split(",") if x]
    unknown = [x for x in silent if x not in set(data.sensor_ids)]
    if unknown:
        raise bad_input(
            f"silent={own['silent']}",
            f"sensors {unknown[:5]} are not in {data.where}",
            f"name sensors of the network, e.g. {data.sensor_ids[0]}",
        )
    result, seconds = R.run_forecast(
        cfg,
        data,
        trained,
        ends,
        out_dir,
        progress,
        engine_wrapper,
        silent or None,
        float(own.get("noise", 0.0)),
    )
    if result.silent_sensors:
        progress(
            f"{len(result.silent_sensors)} sensor(s) silenced, forecast by the "
            f"fallback ({result.fallback}): {result.silent_sensors[:10]}"
        )
    missing = [x for x in result.missing_sensors if x not in set(result.silent_sensors)]
    if missing:
        progress(
            f"warning: {len(missing)} sensor(s) did not answer and have no forecast: {missing[:10]}"
        )
    wanted = [s for s in own.get("sensors", "").split(",") if s]
    shown = O.pick_sensors(result, data, int(own["plot_sensors"]), wanted, int(own["history"]))
    summary = {
        "run": str(run_dir),
        "checkpoint": str(ckpt),
        "best_round": trained.best_round,
        "method": str(cfg.federation.method),
        "engine": str(cfg.engine.name),
        "dataset": data.name,
        "sensors": data.num_nodes,
        "answered": int(result.answered.sum()),
        "missing_sensors": missing,
        "missing": result.missing,
        "silent_sensors": result.silent_sensors,
        "fallback": result.fallback,
        "noise": float(own.get("noise", 0.0)),
        "seconds": {"forecast": seconds, **result.seconds},
        "bytes": result.bytes,
    }
    first, last = data.timestamps[ends[0]], data.timestamps[ends[-1]]
    if rolling:
        base = out_dir / f"rolling_{_stamp(first)}_{_stamp(last)}"
        metrics, table = O.rolling_errors(result, data)
        summary |= {
            "period": {"start": str(first), "end": str(last), "windows": len(ends)},
            "metrics": metrics,
            "per_horizon": table.to_dict(orient="list"),
        }
        files = [
            O.write_csv(base.with_suffix(".csv"), table),
            O.plot_rolling(base.with_suffix(".png"), result, data, table, shown[:2]),
        ]
        if own["save_forecasts"].lower() in ("1", "true", "yes"):
            import pandas as pd

            frames = [O.tidy(result, data, w, issued=True) for w in range(len(ends))]
            files.append(
                O.write_csv(
                    base.with_name(base.name + "_forecasts.csv"),
                    pd.concat(frames, ignore_index=True),
                )
            )
    else:
        base = out_dir / f"forecast_{_stamp(first)}"
        summary |= {
            "issued_at": str(first),
            "horizon_steps": int(result.forecast.shape[1]),
            "interval_minutes": data.interval_minutes,
        }
        files = [
            O.write_csv(base.with_suffix(".csv"), O.tidy(result, data)),
            O.plot_forecast(
                base.with_suffix(".png"), result, data, shown, int(own["history"]), in_steps
            ),
        ]
    summary["seconds"]["total"] = time.perf_counter() - t_start
    summary["files"] = [str(f) for f in files] + [str(base.with_suffix(".json"))]
    O.write_json(base.with_suffix(".json"), summary)
    return summary


def _report(summary: dict, progress=print) -> None:
    s = summary["seconds"]
    phases = ", ".join(
        f"{k} {v:.2f}s"
        for k, v in s.items()
        if k in ("shards", "startup", "connect", "setup", "encode", "server", "decode")
    )
    progress(
        f"{summary['answered']}/{summary['sensors']} sensors forecast in "
        f"{s['forecast']:.2f} s ({phases}); total {s['total']:.1f} s"
    )
    if "metrics" in summary:
        m, per = summary["metrics"], summary["per_horizon"]
        progress(
            f"period {summary['period']['start']} .. {summary['period']['end']} "
            f"({summary['period']['windows']} forecasts)"
        )
        progress(f"{'minutes':>8} {'MAE':>7} {'RMSE':>7} {'MAPE%':>7}   (masked)")
        for i in range(len(per["horizon"])):
            if per["horizon"][i] in (1, 3, 6, 12):
                progress(
                    f"{per['minutes'][i]:>8g} {per['masked_mae'][i]:7.3f} "
                    f"{per['masked_rmse'][i]:7.3f} {100 * per['masked_mape'][i]:7.2f}"
                )
        progress(
            f"{'all':>8} {m['masked_mae']:7.3f} {m['masked_rmse']:7.3f} "
            f"{100 * m['masked_mape']:7.2f}   unmasked RMSE {m['rmse']:.3f}"
        )
    for f in summary["files"]:
        progress(f"wrote {f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry; exit status 2 on bad input."""
    return console("cnfgnn-forecast", __doc__, lambda args: _report(run(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
