"""``load_dataset(cfg)``: build a :class:`SensorData` from a ``conf/dataset/*.yaml`` group.

``cfg.kind`` picks the loader; the other keys are its arguments, with these short names::

    synthetic    -> generate_synthetic(num_nodes, days, interval_minutes, seed, ...)
    dcrnn_h5     -> load_dcrnn_h5(h5, adj_pkl, locations, key, missing_value)
    dcrnn_npz    -> load_dcrnn_npz(dir, adj_pkl, locations, start, interval_minutes, split)
    los_loop     -> load_los_loop(speed, adjacency | adj_pkl (per graph), start, interval_minutes,
                                  locations, graph)
    csv          -> load_csv(series, adjacency | distances | locations, missing_value, threshold)
    metrla_json  -> load_metrla_json(path, locations, start)

``name`` is passed to every loader; ``in_steps``, ``out_steps`` and ``split`` are window
settings (``split`` is also checked against the npz files), checked right after loading so that
a series too short for them is reported with the user's file, before any training. The step
length is read from the data (``SensorData.interval_minutes``); only the loaders of files
without a time axis (Los-loop, synthetic) take it as an option. Relative paths are resolved
against the current working directory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from cnfgnn.data.dataset import SensorData
from cnfgnn.data.dcrnn import load_adj_pkl, load_dcrnn_h5, load_dcrnn_npz
from cnfgnn.data.errors import bad_input
from cnfgnn.data.synthetic import generate_synthetic
from cnfgnn.data.tabular import load_csv, load_los_loop, load_metrla_json
from cnfgnn.data.windows import split_starts

__all__ = [
    "load_dataset",
    "check_windows",
    "graph_label",
    "load_adj_pkl",
    "load_dcrnn_h5",
    "load_dcrnn_npz",
    "load_los_loop",
    "load_csv",
    "load_metrla_json",
    "generate_synthetic",
    "LOADERS",
]

# kind -> (loader, {config key: loader argument})
LOADERS: dict[str, tuple[Callable[..., SensorData], dict[str, str]]] = {
    "synthetic": (generate_synthetic, {}),
    "dcrnn_h5": (
        load_dcrnn_h5,
        {"h5": "h5_path", "adj_pkl": "adj_pkl_path", "locations": "locations_path"},
    ),
    "dcrnn_npz": (load_dcrnn_npz, {"adj_pkl": "adj_pkl_path", "locations": "locations_path"}),
    "los_loop": (
        load_los_loop,
        {
            "speed": "speed_csv",
            "adjacency": "adj_csv",
            "adj_pkl": "adj_pkl_path",
            "locations": "locations_path",
        },
    ),
    "csv": (load_csv, {"series": "series_csv"}),
    "metrla_json": (load_metrla_json, {"locations": "locations_path"}),
}
WINDOW_KEYS = ("in_steps", "out_steps", "split")


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        try:
            return dict(
                OmegaConf.to_container(
                    cfg,
                    resolve=True,  # type: ignore[arg-type]
                    throw_on_missing=True,
                )
            )
        except MissingMandatoryValue as e:
            key = getattr(e, "full_key", None) or "a required value"
            raise bad_input(
                f"dataset config {cfg.get('name', '?')!r}",
                f"{key} is not set",
                f"set it on the command line, e.g. dataset.{str(key).split('.')[-1]}=PATH",
            ) from None
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"dataset config must be a mapping, got {type(cfg).__name__}")


def loader_kwargs(cfg: Any) -> tuple[Callable[..., SensorData], dict[str, Any]]:
    """The loader for ``cfg.kind`` and its keyword arguments (unknown keys are an error)."""
    c = _plain(cfg)
    kind = c.pop("kind", None)
    if kind not in LOADERS:
        raise bad_input(
            f"dataset config {c.get('name', '?')!r}",
            f"unknown kind {kind!r}",
            f"set dataset.kind to one of {sorted(LOADERS)}",
        )
    fn, alias = LOADERS[kind]
    split = c.pop("split", None)
    for k in WINDOW_KEYS:
        c.pop(k, None)
    kwargs = {alias.get(k, k): v for k, v in c.items()}
    params = inspect.signature(fn).parameters
    if kind == "dcrnn_npz" and split is not None:
        kwargs["split"] = (split["train"], split["val"], split["test"])
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        known = sorted({next((k for k, v in alias.items() if v == p), p) for p in params})
        raise bad_input(
            f"dataset config {c.get('name', kind)!r}",
            f"unknown option(s) {unknown} for kind {kind!r}",
            f"use only {known} (and {list(WINDOW_KEYS)})",
        )
    missing = [
        p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs
    ]
    if missing:
        inv = {v: k for k, v in alias.items()}
        raise bad_input(
            f"dataset config {c.get('name', kind)!r}",
            f"kind {kind!r} needs {[inv.get(p, p) for p in missing]}",
            "set them, e.g. dataset." + inv.get(missing[0], missing[0]) + "=PATH",
        )
    for k in ("free_speed_mph", "bottleneck_capacity", "demand_level"):
        if k in kwargs and isinstance(kwargs[k], list):
            kwargs[k] = tuple(kwargs[k])
    return fn, kwargs


def graph_label(cfg: Any) -> str:
    """Which road graph a ``dataset`` config uses, for ``final.json`` and tables.

    ``dataset.graph`` when the config has that choice (Los-loop: ``metr_la`` | ``los_adj``),
    else the graph's source: the adjacency pickle's name (``adj_mx.pkl``), ``<key>:<file>``
    for a user CSV's graph file, ``json`` for METRLA.json's edges, ``synthetic``.
    """
    c = cfg if isinstance(cfg, Mapping) else {}
    if isinstance(cfg, DictConfig):
        c = {
            k: cfg.get(k)
            for k in ("kind", "graph", "adj_pkl", "adjacency", "distances", "locations")
        }
    kind = str(c.get("kind"))
    if c.get("graph"):
        return str(c["graph"])

    def name(value: Any) -> str:
        return PurePath(str(value)).name.removesuffix(".gz")

    if kind in ("dcrnn_h5", "dcrnn_npz") and c.get("adj_pkl"):
        return name(c["adj_pkl"])
    if kind == "csv":
        key = next((k for k in ("adjacency", "distances", "locations") if c.get(k)), None)
        return f"{key}:{name(c[key])}" if key else "none"
    return {"metrla_json": "json", "synthetic": "synthetic"}.get(kind, kind)


def check_windows(data: SensorData, cfg: Any) -> None:
    """Raise a :class:`DataError` naming ``data``'s file unless ``cfg``'s window settings
    (``in_steps``, ``out_steps``, ``split``) give every split at least one window."""
    c = _plain(cfg)
    if not all(k in c for k in WINDOW_KEYS):
        return
    s = c["split"]
    split_starts(
        data.num_steps,
        int(c["in_steps"]),
        int(c["out_steps"]),
        float(s["train"]),
        float(s["val"]),
        float(s["test"]),
        source=data.where,
    )


def load_dataset(cfg: Any, windows: bool = True) -> SensorData:
    """Load (or generate) the dataset described by a ``dataset`` config group.

    Args:
        cfg: DictConfig or dict with ``kind`` and the loader's options (see module docstring).
        windows: check that the series holds the config's train/val/test windows
            (:func:`check_windows`); False for data that only feed a forecast.

    Returns:
        The dataset.
    """
    fn, kwargs = loader_kwargs(cfg)
    data = fn(**kwargs)
    if windows:
        check_windows(data, cfg)
    return data
