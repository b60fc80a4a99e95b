"""Federated inference over Flower: the ServerApp's forecast mode and its simulation driver.

A config with a ``forecast`` section (``checkpoint``: the trained run's ``checkpoint.pt``,
``ends``: window ends, ``out``: where to write the result) makes the ServerApp run
:class:`~cnfgnn.federation.inference.Forecaster` over its ``Grid`` instead of training; it
writes the :class:`~cnfgnn.federation.inference.ForecastResult` to ``forecast.out``
(``.npz``). The ClientApp needs nothing new: it answers ``query.predict_encode`` and
``query.predict`` with its own series, as composed from the same config.

``run_forecast_simulation`` starts that ServerApp with one SuperNode per client in a Flower
simulation and reads the result back (``cnfgnn-forecast ... engine=simulation``).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf, open_dict

from cnfgnn.federation.flower_config import overrides_for
from cnfgnn.federation.flower_config import state_root
from cnfgnn.federation.inference import ForecastResult, Forecaster, load_trained

log = logging.getLogger(__name__)

FORECAST_KEY = "forecast"


def run_forecast_server(grid: Any, cfg: Any, run_id: int | None = None,
                        progress: Callable[[str], None] = log.info) -> ForecastResult:
    """The ServerApp's forecast mode: setup, one inference exchange, result to ``forecast.out``."""
    from cnfgnn.federation import server_app
    from cnfgnn.federation.flower_engine import FlowerEngine
    from cnfgnn.federation.runner import resolve_device

    req = cfg[FORECAST_KEY]
    graph, expected = server_app.load_server_graph(cfg)
    eng = cfg.engine
    engine = FlowerEngine.from_config(grid, eng, expected, progress)
    transport = (server_app.ENGINE_WRAPPER(engine) if server_app.ENGINE_WRAPPER is not None
                 else engine)
    try:
        t0 = time.perf_counter()
        transport.client_ids()  # wait for the SuperNodes (not counted as inference time)
        waited = time.perf_counter() - t0
        trained = load_trained(str(req.checkpoint), cfg)
        forecaster = Forecaster(cfg, transport, graph, trained,
                                resolve_device(str(cfg.device)), progress)
        result = forecaster.forecast(list(req.ends))
        result.seconds["connect"] = waited
        result.bytes["wire"] = {"total": int(engine.stats()["wire_bytes_total"])}
        result.save(str(req.out))
    finally:
        if run_id is not None and eng.name == "simulation" and not eng.get("keep_node_state"):
            shutil.rmtree(state_root(cfg) / str(run_id), ignore_errors=True)
    return result


def with_request(cfg: Any, checkpoint: str | Path, ends: list[int], out: str | Path) -> Any:
    """A copy of ``cfg`` with the ``forecast`` section that selects the ServerApp's mode."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(new):
        new[FORECAST_KEY] = {"checkpoint": str(Path(checkpoint).resolve()),
                             "ends": [int(e) for e in ends], "out": str(Path(out).resolve())}
    return new


def run_forecast_simulation(cfg: Any, num_clients: int, checkpoint: str | Path,
                            ends: list[int], out_dir: str | Path,
                            progress: Callable[[str], None] = log.info,
                            engine_wrapper: Callable[[Any], Any] | None = None
                            ) -> tuple[ForecastResult, float]:
    """Forecast through a Flower simulation (one SuperNode per client).

    Returns ``(result, seconds)``: the seconds from starting the simulation to its end.
    """
    from cnfgnn.federation.flower_sim import simulate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f".forecast_{time.strftime('%Y%m%d-%H%M%S')}_{id(cfg)}.npz"
    request = with_request(cfg, checkpoint, ends, out)
    t0 = time.perf_counter()
    simulate(request, num_clients, overrides_for(request, out_dir.resolve()), progress,
             engine_wrapper)
    seconds = time.perf_counter() - t0
    if not out.exists():
        raise RuntimeError(f"the Flower simulation ended without its forecasts ({out}); "
                           "see its log above")
    result = ForecastResult.load(out)
    out.unlink()
    return result, seconds
