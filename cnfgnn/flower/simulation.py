"""Start a Flower simulation of a composed config (``cnfgnn engine=simulation ...``), for
training (:func:`run_simulation_experiment`) or forecasting (:func:`run_forecast_simulation`).

The ServerApp and ClientApp are the same as under ``flwr run .``; both compose ``conf/``
from the ``hydra-overrides`` string built here (:func:`cnfgnn.config.overrides_for`: the
command-line overrides when they reproduce the config, every leaf otherwise, plus
``run_dir``). ``flwr.simulation.run_simulation`` has no run config, so the string travels
in ``CNFGNN_HYDRA_OVERRIDES`` (set for the duration of the simulation, inherited by a
private Ray's actors; sent in the job's ``runtime_env`` to those of a Ray cluster joined with
``engine.ray.address``: :mod:`cnfgnn.flower.ray_cluster`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from cnfgnn import machine
from cnfgnn.config import ENV_OVERRIDES, flower_environment, overrides_for
from cnfgnn.federation.inference import ForecastResult
from cnfgnn.flower import client_app, engine, linkstate, ray_cluster, server_app
from cnfgnn.results import RunWriter
from cnfgnn.shell import UsageError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cli_overrides() -> list[str] | None:
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return None


def backend_config(cfg: Any) -> dict[str, Any]:
    """``engine.backend`` as the plain dict ``run_simulation`` expects.

    With ``engine.ray.address`` set, ``init_args`` join that cluster: ``address`` added, the
    node-level keys ``ray.init`` refuses there (``num_cpus``, ``num_gpus``, ...) dropped
    (:func:`cnfgnn.flower.ray_cluster.init_args`); each actor still takes
    ``client_resources``, from the cluster's pool.

    Ray hides every GPU from an actor that asked for none, so with ``device=cuda`` (or
    ``auto`` on a GPU machine) and ``client_resources.num_gpus: 0`` the actors of a private
    Ray get an equal share of one GPU each (they would otherwise fail or fall back to the
    CPU). On a cluster this machine's GPUs say nothing of the others': ``device=cuda`` there
    needs ``client_resources.num_gpus`` set.

    Raises:
        UsageError: ``device=cuda`` on a cluster with ``client_resources.num_gpus`` 0.
    """
    backend: dict[str, Any] = OmegaConf.to_container(cfg.engine.backend, resolve=True)  # type: ignore[assignment]
    device = str(cfg.device)
    res = backend.setdefault("client_resources", {})
    address = ray_cluster.address_of(cfg)
    if address is not None:
        backend["init_args"] = ray_cluster.init_args(address, backend.get("init_args") or {})
        if device.startswith("cuda") and not res.get("num_gpus"):
            raise UsageError(
                f"device={device} on the Ray cluster engine.ray.address={address} needs "
                "engine.backend.client_resources.num_gpus > 0 (each actor's share of a GPU)"
            )
        return backend
    if (device.startswith("cuda") or device == "auto") and not res.get("num_gpus"):
        if torch.cuda.is_available():
            cpus = float(backend.get("init_args", {}).get("num_cpus") or os.cpu_count() or 1)
            actors = max(1, int(cpus // float(res.get("num_cpus") or 1)))
            res["num_gpus"] = 1.0 / actors
    return backend


def simulate(
    cfg: Any,
    num_clients: int,
    overrides: str,
    progress: Callable[[str], None] = log.info,
    engine_wrapper: Callable[[Any], Any] | None = None,
) -> None:
    """Run the cnfgnn ServerApp and ClientApp as a Flower simulation of ``num_clients``
    SuperNodes; ``overrides`` (the Hydra overrides both apps compose) go in the environment
    (and, on a Ray cluster, in the job's ``runtime_env``: :mod:`cnfgnn.flower.ray_cluster`).
    """
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's link state, at import
    import ray
    from flwr.simulation import run_simulation

    if ray.is_initialized():
        raise RuntimeError(
            "Ray is already initialised in this process; the simulation's "
            "actors would not see its configuration"
        )
    engine.busy_share(cfg.engine.get("poll_busy_share"))  # bad input: before Ray starts
    machine.tune_malloc(cfg.engine.get("malloc"))  # before Flower starts the ServerApp's thread
    env = flower_environment()
    env[ENV_OVERRIDES] = overrides
    for key in ("FLWR_HOME", "TMPDIR", "RAY_TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    backend = backend_config(cfg)
    app = server_app.make_app(progress, engine_wrapper)
    flwr_log = logging.getLogger("flwr")
    propagate, flwr_log.propagate = flwr_log.propagate, False  # Flower prints its own log
    try:
        with (
            _environ(env),
            ray_cluster.joined(cfg, backend, env),
            linkstate.fast_message_lookup(),  # Flower's lookup is quadratic in SuperNodes
        ):
            run_simulation(
                server_app=app,
                client_app=client_app.app,
                num_supernodes=num_clients,
                backend_config=backend,
            )
    finally:
        flwr_log.propagate = propagate


def run_simulation_experiment(
    cfg: Any,
    num_clients: int,
    run_dir: str | Path | None = None,
    progress: Callable[[str], None] = log.info,
    engine_wrapper: Callable[[Any], Any] | None = None,
) -> tuple[dict, RunWriter]:
    """Run ``cfg`` as a Flower simulation with one SuperNode per client.

    Returns ``(final metrics, writer)`` like the in-process path (``final`` as written to
    ``final.json``).
    """
    writer = RunWriter(cfg, run_dir)
    progress(
        f"Flower simulation: {num_clients} SuperNodes, "
        f"{cfg.federation.nodes_per_client} sensor(s) each; output={writer.dir}"
    )
    started = time.time()
    simulate(
        cfg,
        num_clients,
        overrides_for(cfg, writer.dir.resolve(), _cli_overrides()),
        progress,
        engine_wrapper,
    )
    final_path = writer.dir / "final.json"
    if not final_path.exists() or final_path.stat().st_mtime < started:
        raise RuntimeError(f"the Flower simulation ended without {final_path}; see its log above")
    return json.loads(final_path.read_text()), writer


def run_forecast_simulation(
    cfg: Any,
    num_clients: int,
    checkpoint: str | Path,
    ends: list[int],
    out_dir: str | Path,
    progress: Callable[[str], None] = log.info,
    engine_wrapper: Callable[[Any], Any] | None = None,
) -> tuple[ForecastResult, float]:
    """Forecast through a Flower simulation (one SuperNode per client).

    Returns ``(result, seconds)``: the seconds from starting the simulation to its end.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f".forecast_{time.strftime('%Y%m%d-%H%M%S')}_{id(cfg)}.npz"
    request = server_app.with_request(cfg, checkpoint, ends, out)
    t0 = time.perf_counter()
    simulate(
        request, num_clients, overrides_for(request, out_dir.resolve()), progress, engine_wrapper
    )
    seconds = time.perf_counter() - t0
    if not out.exists():
        raise RuntimeError(
            f"the Flower simulation ended without its forecasts ({out}); see its log above"
        )
    result = ForecastResult.load(out)
    out.unlink()
    return result, seconds
