"""Federated inference as a real Flower deployment on loopback
(``cnfgnn-forecast ... engine=deployment``).

:func:`deploy_forecast` writes one shard per client of the forecast's dataset
(``federation.nodes_per_client`` sensors each), starts a SuperLink and one SuperNode per shard
(:class:`cnfgnn.deploy.launcher.Deployment`, the same processes as a training deployment),
and submits
the forecast request with ``flwr run . <connection> --stream``: the run-config key
``hydra-overrides`` carries the config with its ``forecast`` section (checkpoint, window ends
and result path, all absolute: the ServerApp runs in its own ``flwr-serverapp`` process). The
ServerApp runs :class:`~cnfgnn.federation.inference.Forecaster` over its ``Grid``; each
SuperNode encodes and decodes with its own shard and sends back only ``h_c`` and its
forecasts. The ServerApp writes the result (``.npz``) and this module reads it back.

Everything goes to ``<out>/deployment/<stamp>/``: ``logs/`` (superlink.log,
supernode_<i>.log, flwr_run.log, deployment.json) are kept; ``shards/`` and ``node_state/``
are removed at the end unless ``keep_work=True``. Exactly the processes started here are
stopped, also on an error or Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf, open_dict

from cnfgnn.config import overrides_for
from cnfgnn.data.shards import write_shards
from cnfgnn.deploy.launcher import BIN, DeployError, Deployment, app_dir
from cnfgnn.federation.inference import ForecastResult
from cnfgnn.flower.server_app import with_request

log = logging.getLogger(__name__)


def _request_config(
    cfg: Any, shards_dir: Path, num_clients: int, checkpoint: Path, ends: list[int], out: Path
) -> Any:
    """``cfg`` on the deployment engine, reading ``shards_dir``, with the forecast request."""
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(base):
        base.engine.shards_dir = str(shards_dir)
        base.engine.num_clients = int(num_clients)
    return with_request(base, checkpoint, ends, out)


def _submit(dep: Deployment, overrides: str, timeout_s: float | None) -> float:
    """One ``flwr run`` of the forecast request; returns its wall seconds."""
    path = dep.run_dir / "logs" / "run_config_forecast.toml"
    path.write_text(f"hydra-overrides = {json.dumps(overrides)}\n")
    t0 = time.monotonic()
    proc = dep.procs.start(
        "flwr_run_forecast",
        [
            BIN / "flwr",
            "run",
            app_dir(dep.run_dir / "logs" / "app"),
            dep.connection,
            "--stream",
            "--run-config",
            path,
        ],
        log_name="flwr_run",
    )
    while proc.alive():
        link = dep.procs.procs.get("superlink")
        if link is None or not link.alive():
            raise DeployError(
                f"the SuperLink died during the forecast; see {link.log_path}"
                if link is not None
                else "no SuperLink"
            )
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise DeployError(
                f"the forecast did not finish within {timeout_s:g} s; see {proc.log_path}"
            )
        time.sleep(0.1)
    seconds = time.monotonic() - t0
    dep.procs.stop("flwr_run_forecast", grace_s=5.0)
    return seconds


def deploy_forecast(
    cfg: Any,
    data: Any,
    checkpoint: str | Path,
    ends: list[int] | np.ndarray,
    out_dir: str | Path,
    progress: Callable[[str], None] = log.info,
    timeout_s: float | None = None,
    keep_work: bool = False,
) -> tuple[Any, float]:
    """Forecast windows ``ends`` of ``data`` through a loopback Flower deployment.

    Args:
        cfg: the forecast's config (``cfg.engine.name == "deployment"``; ``engine.launch``
            sets the processes).
        data: the dataset (:class:`~cnfgnn.data.dataset.SensorData`) to shard; the server
            gets only its graph.
        checkpoint: the trained run's ``checkpoint.pt``.
        ends: window ends (time indices).
        out_dir: the forecast's output directory; the deployment works in
            ``<out_dir>/deployment/<stamp>``.
        timeout_s: give up on the ``flwr run`` after this long (None: the ServerApp's own
            timeouts, ``engine.wait_for_nodes_s`` and ``engine.timeout_s``, apply).
        keep_work: keep the shards and node state (default: removed; logs are kept).

    Returns:
        ``(ForecastResult, seconds)``: ``seconds`` is the ``flwr run`` (submission to result);
        ``result.seconds`` also holds ``shards`` and ``startup`` (SuperLink + SuperNodes up).
    """
    if str(cfg.engine.name) != "deployment":
        raise DeployError(f"engine={cfg.engine.name}: deploy_forecast needs engine=deployment")
    out_dir = Path(out_dir).resolve()
    work = out_dir / "deployment" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while work.exists():
        work, n = work.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}_{n}"), n + 1
    work.mkdir(parents=True)
    shards_dir = work / "shards"
    result_path = work / "forecast.npz"
    t0 = time.monotonic()
    write_shards(data, shards_dir, cfg.federation.nodes_per_client)
    shard_s = time.monotonic() - t0
    try:
        with Deployment(cfg, work, shards_dir, progress) as dep:
            request = _request_config(
                cfg,
                shards_dir,
                dep.num_nodes,
                Path(checkpoint).resolve(),
                [int(e) for e in ends],
                result_path,
            )
            overrides = overrides_for(request, work)
            startup = dep.start()
            seconds = _submit(dep, overrides, timeout_s)
        dep.info["forecast_s"] = seconds
        dep._write_info()
        if not result_path.exists():
            raise DeployError(
                f"the forecast run ended without its result ({result_path}); "
                f"see {work / 'logs' / 'flwr_run.log'}"
            )
        result = ForecastResult.load(result_path)
    finally:
        if not keep_work:
            shutil.rmtree(shards_dir, ignore_errors=True)
            shutil.rmtree(work / "node_state", ignore_errors=True)
            result_path.unlink(missing_ok=True)
    if dep.info.get("leftover_pids"):
        raise DeployError(f"processes still alive after stop: {dep.info['leftover_pids']}")
    result.seconds["shards"] = shard_s
    result.seconds["startup"] = startup
    progress(
        f"[deploy] {dep.num_nodes} SuperNodes: start-up {startup:.1f} s, forecast "
        f"run {seconds:.1f} s; logs in {work / 'logs'}"
    )
    return result, seconds
