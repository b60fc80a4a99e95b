"""What a forecast needs: the trained run, the data, checks on both, and the exchange.

A run directory (``outputs/<name>/<timestamp>_<seed>/``) holds ``config.yaml`` and
``checkpoint.pt``. The forecast uses the run's config with a few options a user may change
(the dataset's location or a newer series of the same network, the engine, the device);
the model, the method and the window lengths stay the run's.

Every problem raises :class:`~cnfgnn.data.errors.DataError` (``source: problem. Fix: ...``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from cnfgnn import machine, paths
from cnfgnn.config import compose_cfg
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.errors import DataError, bad_input
from cnfgnn.data.graph import graph_fingerprint
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.nodes import client_groups
from cnfgnn.deploy.forecast import deploy_forecast
from cnfgnn.deploy.launcher import DeployError
from cnfgnn.device import resolve_device
from cnfgnn.experiment import build_workers
from cnfgnn.federation.engines import InProcessEngine
from cnfgnn.federation.inference import Forecaster, ForecastResult, TrainedModel, check_method
from cnfgnn.federation.rounds import ServerGraph
from cnfgnn.flower.simulation import run_forecast_simulation

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint.pt"
#: Options of the run's config a forecast may change (``key`` or ``key.*``).
EDITABLE = (
    "dataset",
    "engine",
    "device",
    "threads",
    "federation.nodes_per_client",
    "federation.eval_batch_size",
    "federation.server_eval_batch_size",
)
#: Dataset options fixed by the trained model.
FIXED_DATASET_KEYS = ("in_steps", "out_steps")
ENGINES = ("inprocess", "simulation", "deployment")


def locate_run(path: str | Path) -> tuple[Path, Path]:
    """``(run directory, checkpoint file)`` from a run directory or a checkpoint path."""
    p = Path(path).expanduser()
    if p.is_dir():
        run_dir, ckpt = p, p / CHECKPOINT_FILE
    elif p.is_file():
        run_dir, ckpt = p.parent, p
    else:
        raise bad_input(
            p,
            "no such run directory or checkpoint",
            "pass a run directory (outputs/<name>/<timestamp>_<seed>) or its checkpoint.pt",
        )
    if not (run_dir / CONFIG_FILE).is_file():
        raise bad_input(
            run_dir,
            f"no {CONFIG_FILE}: not a cnfgnn run directory",
            "pass the directory a `cnfgnn` run wrote",
        )
    if not ckpt.is_file():
        raise bad_input(
            run_dir,
            f"no {CHECKPOINT_FILE}: the run has not finished a round "
            "(or its checkpoint was removed)",
            "train it first (`cnfgnn ... run_dir=<dir>`, or `resume=true` to "
            "continue) or pass a run directory that holds checkpoint.pt",
        )
    return run_dir, ckpt


def _own_keys() -> tuple[str, ...]:
    from cnfgnn.forecast.cli import OWN_KEYS

    return OWN_KEYS


def _allowed(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in EDITABLE)


def _group(name: str, group: str) -> DictConfig:
    path = paths.conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (paths.conf_dir() / group).glob("*.yaml"))
        raise bad_input(f"{group}={name}", f"no such {group} config", f"use one of {names}")
    return OmegaConf.load(path)


def run_config(
    run_dir: Path, overrides: list[str], per_node_ok: bool = False
) -> tuple[DictConfig, bool]:
    """The run's config with the forecast's overrides; and whether the dataset changed.

    Keys the current ``conf/`` added since the run was trained get their defaults; the
    ``dataset`` and ``engine`` groups are taken whole (from the run, or from ``conf/`` when
    switched with ``dataset=NAME`` / ``engine=NAME``).
    """
    run = OmegaConf.load(run_dir / CONFIG_FILE)
    base = OmegaConf.create(OmegaConf.to_container(compose_cfg(""), resolve=True))
    cfg = OmegaConf.merge(base, run)
    cfg.dataset, cfg.engine = run.dataset, run.engine
    changed = False
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+")
        if not _allowed(key):
            from cnfgnn.shell import did_you_mean

            hint = did_you_mean(key, [*EDITABLE, *_own_keys()], inline=True)
            raise bad_input(
                f"option {item!r}",
                "a forecast may not change this setting of "
                f"the trained run, or it is misspelt{hint}",
                f"change only {list(EDITABLE)}",
            )
        if key.split(".")[-1] in FIXED_DATASET_KEYS and key.startswith("dataset"):
            raise bad_input(
                f"option {item!r}",
                "the window lengths are fixed by the trained model",
                f"drop it (the run uses dataset.in_steps="
                f"{run.dataset.in_steps}, out_steps={run.dataset.out_steps})",
            )
        if key in ("dataset", "engine"):
            cfg[key] = _group(value, key)
        else:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        changed |= key.startswith("dataset")
    for k in FIXED_DATASET_KEYS:
        cfg.dataset[k] = run.dataset[k]
    if str(cfg.engine.name) not in ENGINES:
        raise bad_input(
            f"engine={cfg.engine.name}",
            "cnfgnn-forecast runs in-process, as a "
            "Flower simulation or as a loopback Flower deployment",
            "use engine=inprocess, engine=simulation or engine=deployment",
        )
    check_method(cfg, run_dir, per_node_ok)  # per_node_ok: robustness evaluation
    return cfg, changed


def check_network(
    data: SensorData, trained: TrainedModel, run_cfg: Any, dataset_changed: bool, source: Path
) -> None:
    """Raise unless ``data`` is the network the model was trained on (ids, order, graph)."""
    ref = trained.graph
    if ref is None:  # older checkpoints: compare with the training data themselves
        if not dataset_changed:
            return
        try:
            train = load_dataset(OmegaConf.load(source / CONFIG_FILE).dataset, windows=False)
        except DataError as exc:
            raise bad_input(
                source,
                "the checkpoint does not record the training network "
                f"and the training data cannot be loaded to compare ({exc})",
                "forecast with the run's own dataset options",
            ) from None
        ref = graph_fingerprint(train.adjacency, train.sensor_ids)
    got = graph_fingerprint(data.adjacency, data.sensor_ids)
    fix = (
        f"pass a dataset with the training run's sensors and graph (its options are under "
        f"`dataset:` in {source / CONFIG_FILE}), or train a run on this network"
    )
    want_ids, got_ids = list(ref["sensor_ids"]), got["sensor_ids"]
    if want_ids != got_ids:
        lost = [s for s in want_ids if s not in set(got_ids)]
        new = [s for s in got_ids if s not in set(want_ids)]
        what = (
            f"{len(lost)} training sensors missing {lost[:5]}, {len(new)} unknown sensors {new[:5]}"
            if lost or new
            else "the same sensors in another order"
        )
        raise bad_input(data.where, f"its sensors differ from the training run's ({what})", fix)
    if got["adjacency_sha256"] != ref["adjacency_sha256"]:
        raise bad_input(
            data.where,
            "its graph differs from the training run's "
            f"({got['num_edges']} edges, training: {ref['num_edges']}, or other "
            "weights)",
            fix,
        )


# ---------------------------------------------------------------------- time
def step_index(data: SensorData, at: str | None, in_steps: int, what: str = "at") -> int:
    """Time index of ``at`` (default: the last step), checked to have a full input history."""
    ts_all = data.timestamps
    if at is None:
        i = len(ts_all) - 1
    else:
        try:
            ts = pd.Timestamp(str(at))
            inside = ts_all[0] <= ts <= ts_all[-1]
        except (ValueError, TypeError) as exc:
            raise bad_input(
                f"{what}={at}",
                f"not a time stamp of this data ({exc})",
                f"write it like {ts_all[-1]:%Y-%m-%d %H:%M}",
            ) from None
        if not inside:
            raise bad_input(
                f"{what}={at}",
                f"outside the data of {data.where} ({ts_all[0]} .. {ts_all[-1]})",
                "pick a time in that range, or pass dataset options that point at data covering it",
            )
        i = int(ts_all.get_indexer([ts])[0])
        if i < 0:
            near = ts_all[int(ts_all.get_indexer([ts], method="nearest")[0])]
            raise bad_input(
                f"{what}={at}",
                f"not on the data's {data.interval_minutes:g}-minute grid",
                f"use a step of the data, e.g. {near}",
            )
    if i < in_steps - 1:
        raise bad_input(
            f"{what}={ts_all[i]}",
            f"only {i + 1} steps of history up to it; a forecast reads the last {in_steps}",
            f"pick {what} at or after {ts_all[in_steps - 1]}",
        )
    return i


def rolling_ends(
    data: SensorData, start: str, end: str | None, in_steps: int, out_steps: int
) -> np.ndarray:
    """Every step from ``start`` to ``end`` (inclusive; default: one day) as window ends.

    The period's forecasts must all have known targets: ``end`` at most ``out_steps``
    before the data's last step.
    """
    i0 = step_index(data, start, in_steps, "rolling.start")
    if end is None:
        per_day = int(round(24 * 60 / data.interval_minutes))
        i1 = i0 + per_day - 1
        if i1 > data.num_steps - 1 - out_steps:
            raise bad_input(
                f"rolling.start={start}",
                "less than one day of data with known targets follows it",
                "set rolling.end explicitly, or start earlier",
            )
    else:
        i1 = step_index(data, end, in_steps, "rolling.end")
    if i1 < i0:
        raise bad_input(f"rolling.end={end}", "before rolling.start", "swap them")
    last = data.num_steps - 1 - out_steps
    if i1 > last:
        raise bad_input(
            f"rolling.end={data.timestamps[i1]}",
            f"its {out_steps}-step "
            "forecasts run past the end of the data, so their errors are unknown",
            f"end the period at or before {data.timestamps[last]}",
        )
    return np.arange(i0, i1 + 1, dtype=np.int64)


# ---------------------------------------------------------------------- exchange
def run_forecast(
    cfg: Any,
    data: SensorData,
    trained: TrainedModel,
    ends: np.ndarray,
    out_dir: Path,
    progress: Callable[[str], None] = log.info,
    engine_wrapper: Callable[[Any], Any] | None = None,
    silent: list[str] | None = None,
    noise: float = 0.0,
) -> tuple[ForecastResult, float]:
    """Run the inference exchange on ``cfg.engine``; returns ``(result, wall seconds)``.

    ``silent`` (sensor ids) and ``noise`` (input-noise level): robustness options of
    :meth:`Forecaster.forecast`, in-process only.
    """
    machine.apply(cfg)  # threads (null = all cores), progress
    name = str(cfg.engine.name)
    if name in ("simulation", "deployment") and (silent or noise > 0):
        raise bad_input(
            "silent / noise",
            f"the Flower {name} path does not take the robustness options",
            f"drop engine={name} (in-process)",
        )
    if name == "deployment":
        return _deployment_forecast(cfg, data, trained, ends, out_dir, progress, engine_wrapper)
    if name == "simulation":
        return run_forecast_simulation(
            cfg,
            len(client_groups(cfg, data)),
            trained.path,
            ends.tolist(),
            out_dir,
            progress,
            engine_wrapper,
        )
    device = resolve_device(str(cfg.device))
    t0 = time.perf_counter()
    engine: Any = InProcessEngine(build_workers(cfg, data, device))
    if engine_wrapper is not None:
        engine = engine_wrapper(engine)
    graph = ServerGraph.from_data(data)
    result = Forecaster(
        cfg, engine, graph, trained, device, progress, clock=data.time_of_day()
    ).forecast(ends, silent, noise)
    return result, time.perf_counter() - t0


def _deployment_forecast(
    cfg: Any,
    data: SensorData,
    trained: TrainedModel,
    ends: np.ndarray,
    out_dir: Path,
    progress: Callable[[str], None],
    engine_wrapper: Callable[[Any], Any] | None,
) -> tuple[ForecastResult, float]:
    """``engine=deployment``: SuperLink + one SuperNode per shard on loopback
    (:func:`cnfgnn.deploy.forecast.deploy_forecast`)."""
    if engine_wrapper is not None:
        raise bad_input(
            "engine=deployment",
            "the ServerApp runs in its own process, so its engine cannot be wrapped",
            "use engine=simulation or inprocess",
        )
    try:
        return deploy_forecast(cfg, data, trained.path, ends.tolist(), out_dir, progress)
    except DeployError as exc:
        fix = (
            ""
            if "Fix:" in str(exc)
            else (
                " Fix: read the logs named above; "
                "engine.launch.* in conf/engine/deployment.yaml "
                "sets the processes"
            )
        )
        raise DataError(f"engine=deployment: {exc}.{fix}") from exc
