"""The Flower ServerApp: the CNFGNN orchestration over the run's ``Grid``.

``main`` composes the run's config (``hydra-overrides``), loads the graph (never a series),
wraps the grid in a :class:`~cnfgnn.federation.flower_engine.FlowerEngine` and runs the same
:class:`~cnfgnn.federation.rounds.Orchestrator` as the in-process engine, writing the run
directory (``cfg.run_dir``, or a new one under ``cfg.output_root``). ``metrics.jsonl`` and
``final.json`` also get the bytes as Flower serialized them (``wire_bytes``).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cnfgnn import logs, machine
from cnfgnn.federation.flower_config import compose_cfg, overrides_from_run_config, state_root
from cnfgnn.federation.flower_engine import FlowerEngine
from cnfgnn.federation.rounds import Orchestrator, ServerGraph
from cnfgnn.results import RunWriter

log = logging.getLogger(__name__)

app = ServerApp()

# Hooks for the in-process driver (runner, tests): set before a simulation starts.
ENGINE_WRAPPER: Callable[[Any], Any] | None = None  # wraps the FlowerEngine (recording)
LAST_ENGINE: FlowerEngine | None = None  # the engine of the last run in this process
PROGRESS: Callable[[str], None] | None = None  # progress sink (default: this module's log)


def _progress(line: str) -> None:
    (PROGRESS or log.info)(line)


class FlowerRunWriter(RunWriter):
    """A :class:`RunWriter` that adds the engine's serialized-byte counts to each round."""

    def __init__(self, cfg: Any, run_dir: str | Path | None, engine: FlowerEngine):
        super().__init__(cfg, run_dir)
        self.engine = engine

    def log_round(self, record: dict[str, Any]) -> None:
        super().log_round(record | self.engine.stats())

    def write_final(self, final: dict[str, Any]) -> Path:
        return super().write_final(final | self.engine.stats())


def load_server_graph(cfg: Any) -> tuple[ServerGraph, int | None]:
    """The graph the server holds, and how many clients to expect.

    With ``engine.shards_dir`` (a deployment's shard set, :mod:`cnfgnn.data.shards`): its
    ``server/graph.npz`` and the manifest's client count. Otherwise the graph of the dataset
    in ``cfg.dataset`` (its series are dropped right away) and its client partition.
    ``engine.num_clients`` overrides the count.
    """
    shards_dir = cfg.engine.get("shards_dir")
    expected = cfg.engine.get("num_clients")
    if shards_dir:
        from cnfgnn.data.shards import load_manifest
        from cnfgnn.data.shards import load_server_graph as read_graph

        g = read_graph(str(shards_dir))
        graph = ServerGraph(np.asarray(g["adjacency"]), list(g["sensor_ids"]), g["locations"])
        if expected is None:
            expected = load_manifest(str(shards_dir))["num_clients"]
        return graph, int(expected)
    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.federation.runner import client_groups

    data = load_dataset(cfg.dataset)
    graph = ServerGraph(np.asarray(data.adjacency), list(data.sensor_ids), data.locations)
    if expected is None:
        expected = len(client_groups(cfg, data))
    del data
    return graph, int(expected)


def run_server(grid: Grid, cfg: Any, run_id: int | None = None,
               progress: Callable[[str], None] = _progress) -> dict[str, Any]:
    """Run one CNFGNN experiment over ``grid``; returns ``final.json``'s content."""
    global LAST_ENGINE
    from cnfgnn.federation.runner import resolve_device
    from cnfgnn.plots import plot_run

    machine.apply(cfg)  # threads (null = all cores), progress
    device = resolve_device(str(cfg.device))
    graph, expected = load_server_graph(cfg)
    eng = cfg.engine
    engine = FlowerEngine.from_config(grid, eng, expected, progress)
    LAST_ENGINE = engine
    transport = ENGINE_WRAPPER(engine) if ENGINE_WRAPPER is not None else engine
    writer = FlowerRunWriter(cfg, cfg.run_dir, engine)
    progress(f"{cfg.federation.method} on {cfg.dataset.name}: {len(graph.sensor_ids)} nodes, "
             f"engine={eng.name} (Flower), device={device}, output={writer.dir}")
    try:
        final = Orchestrator(cfg, transport, graph, writer, progress, device).run()
        final["method"] = str(cfg.federation.method)
        final["engine"] = str(eng.name)
        final["plots"] = [str(p) for p in plot_run(writer.dir, graph.locations)]
        final.update(engine.stats())
        writer.write_final(final)
    finally:
        if run_id is not None and eng.name == "simulation" and not eng.get("keep_node_state"):
            shutil.rmtree(state_root(cfg) / str(run_id), ignore_errors=True)
    return final


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry: ``flwr run .`` or ``run_simulation`` start it."""
    if not logs.has_console():  # a ServerApp process of a deployment: its log is stdout
        logs.setup(stream=sys.stdout)
    cfg = compose_cfg(overrides_from_run_config(context.run_config))
    if cfg.get("forecast") is not None:  # inference with a trained run (cnfgnn-forecast)
        from cnfgnn.federation.flower_forecast import run_forecast_server

        run_forecast_server(grid, cfg, run_id=context.run_id, progress=_progress)
        return
    run_server(grid, cfg, run_id=context.run_id)
