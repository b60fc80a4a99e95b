"""Run one experiment: build a federation from a config and run it on the chosen engine.

The in-process engine gives each client a :class:`NodeWorker` holding only that client's
columns of the series; the server orchestration gets only the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cnfgnn import machine
from cnfgnn.baselines.centralized import CentralTrainer
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.nodes import client_groups
from cnfgnn.device import resolve_device
from cnfgnn.federation.engines import local_engine
from cnfgnn.federation.node import LocalSeries, NodeWorker
from cnfgnn.federation.rounds import Orchestrator, ServerGraph
from cnfgnn.flower.simulation import run_simulation_experiment
from cnfgnn.results import (  # NODE_STORE: the nodes' disks, one machine
    NODE_STORE,
    RunWriter,
    finish_run,
)

log = logging.getLogger(__name__)


def build_workers(
    cfg: Any, data: SensorData, device: torch.device, store: str | Path | None = None
) -> dict[int, NodeWorker]:
    """One worker per client, each holding only its own nodes' columns.

    ``store``: the nodes' own disk (each sensor's kept model for per-node methods, its test
    forecasts for plots; one file per sensor); the server never reads it.
    """
    tod = data.time_of_day()
    workers = {}
    for cid, nodes in enumerate(client_groups(cfg, data)):
        series = LocalSeries.from_data(data, nodes, cfg.dataset, tod)
        workers[cid] = NodeWorker(series, cfg, device, store=store)
    return workers


def run_experiment(
    cfg: Any,
    run_dir: str | Path | None = None,
    progress: Callable[[str], None] = log.info,
    engine_wrapper: Callable[[Any], Any] | None = None,
) -> tuple[dict, RunWriter]:
    """Load the data, build the engine named in ``cfg.engine.name``, train and test.

    Args:
        cfg: composed config.
        run_dir: output directory (default: a new one under ``cfg.output_root``).
        progress: one-line progress sink.
        engine_wrapper: optional wrapper around the engine (tests record payloads with it).

    Returns:
        ``(final metrics, writer)``.
    """
    machine.apply(cfg)  # threads (null = all cores), progress
    device = resolve_device(str(cfg.device))
    data = load_dataset(cfg.dataset)
    graph = ServerGraph.from_data(data)
    name = str(cfg.engine.name)
    if str(cfg.federation.method) == "central":  # pooled data: no federation, no engine
        writer = RunWriter(cfg, run_dir)
        progress(
            f"central ({'GRU + GN' if cfg.model.graph_embedding else 'GRU'}) on {data.name}: "
            f"{data.num_nodes} nodes, {data.num_steps} steps, device={device}, "
            f"output={writer.dir}"
        )
        final = CentralTrainer(cfg, data, writer, progress, device).run()
        return _finish(final, writer, data, "central")
    if name == "simulation":  # Flower simulation: the ServerApp runs the Orchestrator
        return run_simulation_experiment(
            cfg, len(client_groups(cfg, data)), run_dir, progress, engine_wrapper
        )
    if name != "inprocess":
        raise ValueError(
            f"unknown engine {name!r}; available: inprocess, simulation "
            "(deployment: cnfgnn-deploy and `flwr run .`)"
        )
    # the nodes keep their best models (per-node methods) and test forecasts on their own
    # disk, here <run>/node_store/
    writer = RunWriter(cfg, run_dir)
    local = local_engine(cfg, build_workers(cfg, data, device, writer.dir / NODE_STORE), device)
    engine: Any = local if engine_wrapper is None else engine_wrapper(local)
    forked = f" ({local.processes} client processes)" if local.processes > 1 else ""
    try:
        progress(
            f"{cfg.federation.method} on {data.name}: {data.num_nodes} nodes, "
            f"{data.num_steps} steps, engine={name}{forked}, device={device}, "
            f"output={writer.dir}"
        )
        final = Orchestrator(cfg, engine, graph, writer, progress, device).run()
    finally:
        local.close()
    return _finish(final, writer, data, name, str(cfg.federation.method))


def _finish(
    final: dict, writer: RunWriter, data: SensorData, engine: str, method: str = "central"
) -> tuple[dict, RunWriter]:
    finish_run(final, writer, data.locations, data.interval_minutes, engine, method)
    return final, writer
