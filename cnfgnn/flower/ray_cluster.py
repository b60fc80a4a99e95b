"""``engine=simulation`` on an existing Ray cluster (``engine.ray.address``).

With ``engine.ray.address: null`` Flower's ``RayBackend`` starts a private Ray in this process
from ``engine.backend.init_args``. With ``auto`` or ``HOST:PORT`` this process (the driver:
the ServerApp and Flower's simulation runtime) joins that cluster instead, and the ClientApp
actors run on any of its nodes, each taking ``engine.backend.client_resources`` from the
cluster's pool. Three things differ from a private Ray:

* ``ray.init`` refuses node-level arguments (``num_cpus``, ``num_gpus``, ...) when it joins a
  cluster: each node declares those to its own ``ray start``. :func:`init_args` drops them
  and adds ``address``.
* Each node's raylet starts the actors, so they do not inherit the driver's environment,
  and their working directory is the raylet's. What the apps read from the environment (the
  run's Hydra overrides, the absolute node-state root) travels in the job's ``runtime_env``
  (:func:`actor_environment`). Flower's ``RayBackend`` passes a ``runtime_env`` of its own to
  ``ray.init``, so :func:`joined` connects before ``run_simulation`` and Flower reuses that
  connection (it calls ``ray.init`` only when Ray is not initialised).
* ``ray.init`` on an address nobody answers retries for minutes without raising (measured:
  still retrying after 5 minutes). :func:`check_reachable` first tries the cluster's GCS port
  for ``engine.ray.connect_timeout_s`` and fails with one message naming the key and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from cnfgnn.config import ENV_OVERRIDES, ENV_STATE_ROOT, FLOWER_ENV_DEFAULTS, state_root
from cnfgnn.paths import ENV_CONF
from cnfgnn.shell import UsageError

log = logging.getLogger(__name__)

#: ``ray.init`` arguments a joining driver may not pass (``ray start`` sets them per node).
NODE_ONLY_INIT_ARGS = (
    "num_cpus",
    "num_gpus",
    "resources",
    "labels",
    "object_store_memory",
    "_system_config",
    "_enable_object_reconstruction",
    "_node_name",
)
#: Driver environment variables passed on to the actors when set (besides the run's own).
PASSED_ENV = ("PYTHONPATH", ENV_CONF)
#: Seconds between connection attempts while ``engine.ray.connect_timeout_s`` runs.
RETRY_S = 0.5


class ClusterUnreachable(UsageError):
    """``engine.ray.address`` names no Ray cluster this machine can reach."""


def address_of(cfg: Any) -> str | None:
    """``engine.ray.address`` of ``cfg``: ``None`` (start a private Ray), ``"auto"`` or
    ``"HOST:PORT"``."""
    ray_cfg = cfg.engine.get("ray") or {}
    address = ray_cfg.get("address")
    return None if address in (None, "") else str(address)


def init_args(address: str, private_args: dict[str, Any]) -> dict[str, Any]:
    """``ray.init`` keyword arguments that join ``address``: ``private_args`` (those of a
    private Ray, ``engine.backend.init_args``) without :data:`NODE_ONLY_INIT_ARGS`."""
    args = {k: v for k, v in private_args.items() if k not in NODE_ONLY_INIT_ARGS}
    args["address"] = address
    return args


def _unreachable(address: str, why: str) -> ClusterUnreachable:
    return ClusterUnreachable(
        f"engine.ray.address={address}: {why}. Start the cluster first "
        "(`ray start --head --port=6379` on the head node), give the head's HOST:PORT "
        "(or `auto` on a machine where `ray start` ran), or set engine.ray.address=null "
        "to start a private Ray"
    )


def check_reachable(address: str, timeout_s: float) -> str:
    """Resolve ``address`` as ``ray.init`` would (``auto``: ``$RAY_ADDRESS`` or the last
    ``ray start`` on this machine; ``localhost``: this node's IP) and connect to its GCS port,
    retrying for up to ``timeout_s`` seconds. Returns ``"HOST:PORT"``.

    Raises:
        ClusterUnreachable: no cluster found, or nothing accepts connections there in time.
    """
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        resolved = canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as exc:
        raise _unreachable(address, f"no Ray cluster found ({exc})") from None
    host, _, port = resolved.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return resolved
        except (OSError, ValueError) as exc:
            if time.monotonic() + RETRY_S > deadline:
                raise _unreachable(
                    address, f"nothing answers at {resolved} within {timeout_s:g} s ({exc})"
                ) from None
        time.sleep(RETRY_S)


def actor_environment(cfg: Any, env: dict[str, str]) -> dict[str, str]:
    """The environment variables the ClientApp actors need, from the driver's ``env``: the
    run's overrides, Flower's switches, the node-state root as an absolute path (the server
    removes it after the run; on several machines it must be a shared directory), and
    ``PYTHONPATH``/``$CNFGNN_CONF`` when set."""
    out = {k: env[k] for k in (ENV_OVERRIDES, *FLOWER_ENV_DEFAULTS) if k in env}
    out[ENV_STATE_ROOT] = str(state_root(cfg).resolve())
    for key in PASSED_ENV:
        if os.environ.get(key):
            out[key] = os.environ[key]
    return out


@contextlib.contextmanager
def joined(cfg: Any, backend: dict[str, Any], env: dict[str, str]) -> Iterator[str | None]:
    """Connect this process to the cluster of ``engine.ray.address`` for the duration (yields
    the resolved ``HOST:PORT``); with no address, do nothing (yields ``None``: Flower starts
    a private Ray from ``backend["init_args"]``)."""
    address = address_of(cfg)
    if address is None:
        yield None
        return
    import ray

    resolved = check_reachable(address, float(cfg.engine.ray.connect_timeout_s))
    args = init_args(address, backend.get("init_args") or {})
    try:
        ray.init(runtime_env={"env_vars": actor_environment(cfg, env)}, **args)
    except ConnectionError as exc:
        raise _unreachable(address, f"ray.init failed ({exc})") from None
    pool = ray.cluster_resources()
    log.info(
        "joined the Ray cluster at %s: %d node(s), %g CPU(s), %g GPU(s)",
        resolved,
        sum(1 for node in ray.nodes() if node.get("Alive")),
        pool.get("CPU", 0.0),
        pool.get("GPU", 0.0),
    )
    try:
        yield resolved
    finally:
        if ray.is_initialized():  # Flower's backend normally shuts down first
            ray.shutdown()
