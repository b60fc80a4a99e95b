"""Build a federation from a config and run it on the chosen engine.

The in-process engine gives each client a :class:`NodeWorker` holding only that client's
columns of the series; the server orchestration gets only the graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cnfgnn import machine
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.nodes import partition, select_nodes
from cnfgnn.federation.engines import InProcessEngine
from cnfgnn.federation.node import LocalSeries, NodeWorker
from cnfgnn.federation.rounds import Orchestrator, ServerGraph
from cnfgnn.plots import plot_run
from cnfgnn.results import RunWriter

log = logging.getLogger(__name__)

#: Per-node methods: folder of the run directory standing in for the nodes' own disks.
NODE_STORE = "node_store"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is available; use device=cpu")
    return torch.device(name)


def client_groups(cfg: Any, data: SensorData) -> list[np.ndarray]:
    """Nodes of each client: training and held-out nodes never share a client."""
    k = int(cfg.federation.nodes_per_client)
    n = data.num_nodes
    ratio = cfg.federation.inductive_ratio
    if ratio is None:
        return partition(np.arange(n), k)
    seen = select_nodes(n, float(ratio), data.locations, seed=int(cfg.seed))
    unseen = np.setdiff1d(np.arange(n), seen)
    return partition(seen, k) + (partition(unseen, k) if len(unseen) else [])


def build_workers(cfg: Any, data: SensorData, device: torch.device,
                  store: str | Path | None = None) -> dict[int, NodeWorker]:
    """One worker per client, each holding only its own nodes' columns.

    ``store``: the nodes' own disk for per-node methods (each sensor's kept model, one file
    per sensor); the server never reads it.
    """
    tod = data.time_of_day()
    workers = {}
    for cid, nodes in enumerate(client_groups(cfg, data)):
        series = LocalSeries.from_arrays(nodes, [data.sensor_ids[i] for i in nodes],
                                         data.speed[:, nodes], data.mask[:, nodes], tod,
                                         cfg.dataset)
        workers[cid] = NodeWorker(series, cfg, device, store=store)
    return workers


def run_experiment(cfg: Any, run_dir: str | Path | None = None,
                   progress: Callable[[str], None] = log.info,
                   engine_wrapper: Callable[[Any], Any] | None = None) -> tuple[dict, RunWriter]:
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
    graph = ServerGraph(data.adjacency, list(data.sensor_ids), data.locations)
    name = str(cfg.engine.name)
    if str(cfg.federation.method) == "central":  # pooled data: no federation, no engine
        from cnfgnn.baselines.centralized import CentralTrainer

        writer = RunWriter(cfg, run_dir)
        progress(f"central ({'GRU + GN' if cfg.model.graph_embedding else 'GRU'}) on {data.name}: "
                 f"{data.num_nodes} nodes, {data.num_steps} steps, device={device}, "
                 f"output={writer.dir}")
        final = CentralTrainer(cfg, data, writer, progress, device).run()
        return _finish(final, writer, data, "central")
    writer = None
    if name == "inprocess":
        from cnfgnn.federation.inference import PER_NODE_METHODS

        writer = RunWriter(cfg, run_dir)  # per-node methods: the nodes keep their best models
        store = (writer.dir / NODE_STORE if str(cfg.federation.method) in PER_NODE_METHODS
                 else None)  # on their own disk (here <run>/node_store/) for inference
        engine: Any = InProcessEngine(build_workers(cfg, data, device, store))
    elif name == "simulation":  # Flower simulation: the ServerApp runs the Orchestrator
        from cnfgnn.federation.flower_sim import run_simulation_experiment

        return run_simulation_experiment(cfg, len(client_groups(cfg, data)), run_dir,
                                         progress, engine_wrapper)
    else:
        raise ValueError(f"unknown engine {name!r}; available: inprocess, simulation "
                         "(deployment: launch/ and `flwr run .`)")
    if engine_wrapper is not None:
        engine = engine_wrapper(engine)
    writer = writer or RunWriter(cfg, run_dir)
    progress(f"{cfg.federation.method} on {data.name}: {data.num_nodes} nodes, "
             f"{data.num_steps} steps, engine={name}, device={device}, output={writer.dir}")
    final = Orchestrator(cfg, engine, graph, writer, progress, device).run()
    return _finish(final, writer, data, name, str(cfg.federation.method))


def _finish(final: dict, writer: RunWriter, data: SensorData, engine: str,
            method: str = "central") -> tuple[dict, RunWriter]:
    final["method"] = method
    final["engine"] = engine
    final["plots"] = [str(p) for p in plot_run(writer.dir, data.locations)]
    writer.write_final(final)
    return final, writer
