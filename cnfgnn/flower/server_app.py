"""The Flower ServerApp: the CNFGNN orchestration over the run's ``Grid``.

``main`` composes the run's config (``hydra-overrides``), loads the graph (never a series),
wraps the grid in a :class:`~cnfgnn.flower.engine.FlowerEngine` and runs the same
:class:`~cnfgnn.federation.rounds.Orchestrator` as the in-process engine, writing the run
directory (``cfg.run_dir``, or a new one under ``cfg.output_root``). ``metrics.jsonl`` and
``final.json`` also get the bytes as Flower serialized them (``wire_bytes``).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf, open_dict

from cnfgnn import logs, machine
from cnfgnn.config import compose_cfg, overrides_from_run_config, state_root
from cnfgnn.device import resolve_device
from cnfgnn.federation.graph import load_server_graph
from cnfgnn.federation.inference import Forecaster, ForecastResult, load_trained
from cnfgnn.federation.rounds import Orchestrator
from cnfgnn.flower.engine import FlowerEngine
from cnfgnn.results import RunWriter, finish_run

log = logging.getLogger(__name__)

#: The config section that selects the forecast mode (see :func:`with_request`).
FORECAST_KEY = "forecast"

EngineWrapper = Callable[[Any], Any]


def _print(line: str) -> None:
    """The default progress sink: this module's log."""
    log.info(line)


class FlowerRunWriter(RunWriter):
    """A :class:`RunWriter` that adds the engine's serialized-byte counts to each round."""

    def __init__(self, cfg: Any, run_dir: str | Path | None, engine: FlowerEngine):
        super().__init__(cfg, run_dir)
        self.engine = engine

    def log_round(self, record: dict[str, Any]) -> None:
        super().log_round(record | self.engine.stats())

    def write_final(self, final: dict[str, Any]) -> Path:
        return super().write_final(final | self.engine.stats())


def _drop_node_state(cfg: Any, run_id: int | None) -> None:
    """A simulation's node state is scratch (unless ``engine.keep_node_state``)."""
    eng = cfg.engine
    if run_id is not None and eng.name == "simulation" and not eng.get("keep_node_state"):
        shutil.rmtree(state_root(cfg) / str(run_id), ignore_errors=True)


def run_server(
    grid: Grid,
    cfg: Any,
    run_id: int | None = None,
    progress: Callable[[str], None] = _print,
    engine_wrapper: EngineWrapper | None = None,
) -> dict[str, Any]:
    """Run one CNFGNN experiment over ``grid``; returns ``final.json``'s content.

    ``engine_wrapper`` wraps the :class:`FlowerEngine` the orchestration talks to (tests
    record payloads with it).
    """
    machine.apply(cfg)  # threads (null = all cores), progress
    device = resolve_device(str(cfg.device))
    graph, expected = load_server_graph(cfg)
    eng = cfg.engine
    engine = FlowerEngine.from_config(grid, eng, expected, progress)
    transport = engine_wrapper(engine) if engine_wrapper is not None else engine
    writer = FlowerRunWriter(cfg, cfg.run_dir, engine)
    progress(
        f"{cfg.federation.method} on {cfg.dataset.name}: {len(graph.sensor_ids)} nodes, "
        f"engine={eng.name} (Flower), device={device}, output={writer.dir}"
    )
    try:
        final = Orchestrator(cfg, transport, graph, writer, progress, device).run()
        final.update(engine.stats())  # in the returned dict too, not only in final.json
        finish_run(
            final,
            writer,
            graph.locations,
            graph.interval_minutes,
            str(eng.name),
            str(cfg.federation.method),
        )
    finally:
        _drop_node_state(cfg, run_id)
    return final


def run_forecast_server(
    grid: Any,
    cfg: Any,
    run_id: int | None = None,
    progress: Callable[[str], None] = _print,
    engine_wrapper: EngineWrapper | None = None,
) -> ForecastResult:
    """The forecast mode: setup, one inference exchange, the result to ``forecast.out``.

    A config with a ``forecast`` section (``checkpoint``: the trained run's
    ``checkpoint.pt``, ``ends``: window ends, ``out``: where to write the result) makes the
    ServerApp run :class:`~cnfgnn.federation.inference.Forecaster` over its ``Grid``
    instead of training. The ClientApp needs nothing new: it answers
    ``query.predict_encode`` and ``query.predict`` with its own series.
    """
    req = cfg[FORECAST_KEY]
    graph, expected = load_server_graph(cfg)
    engine = FlowerEngine.from_config(grid, cfg.engine, expected, progress)
    transport = engine_wrapper(engine) if engine_wrapper is not None else engine
    try:
        t0 = time.perf_counter()
        transport.client_ids()  # wait for the SuperNodes (not counted as inference time)
        waited = time.perf_counter() - t0
        trained = load_trained(str(req.checkpoint), cfg)
        forecaster = Forecaster(
            cfg, transport, graph, trained, resolve_device(str(cfg.device)), progress
        )
        result = forecaster.forecast(list(req.ends))
        result.seconds["connect"] = waited
        result.bytes["wire"] = {"total": int(engine.stats()["wire_bytes_total"])}
        result.save(str(req.out))
    finally:
        _drop_node_state(cfg, run_id)
    return result


def with_request(cfg: Any, checkpoint: str | Path, ends: list[int], out: str | Path) -> Any:
    """A copy of ``cfg`` with the ``forecast`` section that selects the forecast mode."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(new):
        new[FORECAST_KEY] = {
            "checkpoint": str(Path(checkpoint).resolve()),
            "ends": [int(e) for e in ends],
            "out": str(Path(out).resolve()),
        }
    return new


def make_app(
    progress: Callable[[str], None] = _print, engine_wrapper: EngineWrapper | None = None
) -> ServerApp:
    """A ServerApp whose runs report to ``progress`` and talk through ``engine_wrapper``.

    ``flwr run .`` loads :data:`app` (the defaults); the simulation driver builds its own.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if not logs.has_console():  # a ServerApp process of a deployment: its log is stdout
            logs.setup(stream=sys.stdout)
        cfg = compose_cfg(overrides_from_run_config(context.run_config))
        if cfg.get(FORECAST_KEY) is not None:  # inference with a trained run (cnfgnn-forecast)
            run_forecast_server(grid, cfg, context.run_id, progress, engine_wrapper)
        else:
            run_server(grid, cfg, context.run_id, progress, engine_wrapper)

    return server_app


#: The ServerApp of ``flwr run .`` (``[tool.flwr.app.components]``).
app = make_app()
