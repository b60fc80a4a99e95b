"""The one place that composes ``conf/``, and the Flower processes' environment.

* :func:`conf_dir` / :data:`CONF_DIR`: the Hydra config directory; :func:`compose`: ``conf/``
  with a list of overrides (every command and test composes through it).
* :func:`compose_cfg`: the cached, read-only config of a Flower app. The ServerApp and every
  ClientApp compose ``conf/`` with the overrides in the single run-config key
  ``hydra-overrides`` (``flwr run . --run-config 'hydra-overrides="dataset.num_nodes=20"'``),
  so the server and all clients agree on the experiment. The legacy
  ``flwr.simulation.run_simulation`` entry has no run config; for it the simulation driver
  puts the same string into the environment variable ``CNFGNN_HYDRA_OVERRIDES`` (a private
  Ray's actors inherit the driver's environment; a joined cluster's get it in the job's
  ``runtime_env``), and the apps read it when the run-config key is absent.
* :func:`overrides_for`: the ``hydra-overrides`` string that reproduces a composed config.
* :func:`flower_environment`: what every Flower process needs in its environment.
"""

from __future__ import annotations

import functools
import math
import os
import shlex
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from cnfgnn import paths

RUN_CONFIG_KEY = "hydra-overrides"
ENV_OVERRIDES = "CNFGNN_HYDRA_OVERRIDES"
ENV_STATE_ROOT = "CNFGNN_STATE_ROOT"
STATE_DIR = "state-dir"  # optional node_config key: where that node keeps its state

# Every Flower process gets these (docs/design.md §6): no telemetry, no update check, no
# runtime dependency installation, Flower and Ray files under the working directory.
FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def conf_dir() -> str:
    """The Hydra config directory (``$CNFGNN_CONF`` or the package's; cnfgnn/paths.py)."""
    return str(paths.conf_dir())


#: The config directory at import time (``@hydra.main`` needs a constant).
CONF_DIR = conf_dir()


def flower_environment(root: Path | None = None) -> dict[str, str]:
    """Environment entries every Flower process needs (existing values are kept).

    Flower's home, temporary files and node state go under ``root`` (default: the current
    working directory), never under the installed package.
    """
    root = paths.work_dir() if root is None else Path(root)
    env = dict(FLOWER_ENV_DEFAULTS)
    env["FLWR_HOME"] = str(root / ".flwr")
    env["TMPDIR"] = str(root / ".tmp")
    env["RAY_TMPDIR"] = str(root / ".tmp")
    return {k: os.environ.get(k, v) for k, v in env.items()}


def state_root(cfg: Any, node_config: Any = None) -> Path:
    """Where clients keep their state between messages: node_config ``state-dir``, else
    ``$CNFGNN_STATE_ROOT``, else ``engine.state_root``, else ``.tmp/node_state`` in the
    current working directory.
    """
    for value in (
        (node_config or {}).get(STATE_DIR),
        os.environ.get(ENV_STATE_ROOT),
        cfg.engine.get("state_root"),
    ):
        if value:
            return Path(str(value))
    return paths.work_dir() / ".tmp" / "node_state"


def overrides_from_run_config(run_config: Any) -> str:
    """The override string for this run: run-config key first, then the environment."""
    if run_config is not None and RUN_CONFIG_KEY in run_config:
        return str(run_config[RUN_CONFIG_KEY])
    return os.environ.get(ENV_OVERRIDES, "")


_COMPOSE_LOCK = threading.Lock()


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides``, as the ``cnfgnn`` CLI would.

    Works inside a ``@hydra.main`` job too (``cnfgnn engine=simulation``): the job's global
    Hydra is set aside while composing and put back afterwards.
    """
    with _COMPOSE_LOCK:
        gh = GlobalHydra.instance()
        outer = gh.hydra if gh.is_initialized() else None
        if outer is not None:
            gh.clear()
        try:
            with initialize_config_dir(config_dir=conf_dir(), version_base=None):
                return hydra_compose(config_name, overrides=list(overrides))
        finally:
            if outer is not None:
                GlobalHydra.instance().clear()
                GlobalHydra.instance().initialize(outer)


@functools.lru_cache(maxsize=8)
def compose_cfg(overrides: str) -> DictConfig:
    """``conf/`` composed with a shell-quoted override string, read-only (cached: the Flower
    apps call it per message)."""
    cfg = compose(shlex.split(overrides))
    OmegaConf.set_readonly(cfg, True)
    return cfg


# ---------------------------------------------------------------------- driver side
def _format(value: Any) -> str:
    """A resolved config value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_format(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot express {type(value).__name__} as a Hydra override")


def _leaves(node: Any, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, name + "."))
        else:
            out.append(f"++{name}={_format(value)}")
    return out


def _root_groups() -> list[str]:
    """Config groups in the root defaults list (``dataset``, ``model``, ...)."""
    root = OmegaConf.load(Path(conf_dir()) / "config.yaml")
    groups = []
    for entry in root.get("defaults", []):
        if isinstance(entry, (dict, DictConfig)):
            for key in entry:
                groups.append(str(key).replace("optional ", "").strip())
    return groups


def _plain(cfg: Any) -> dict:
    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in container.items() if k != "hydra"}


def exact_overrides(cfg: Any) -> list[str]:
    """Overrides that make ``conf/`` compose to exactly ``cfg`` (every leaf, resolved)."""
    return [f"~{g}" for g in _root_groups()] + _leaves(_plain(cfg))


def overrides_for(cfg: Any, run_dir: str | Path, cli_overrides: list[str] | None = None) -> str:
    """The ``hydra-overrides`` string under which both apps compose ``cfg`` (+ ``run_dir``).

    The overrides typed on the command line are used when they reproduce ``cfg`` exactly
    (readable in logs); otherwise (a config built in code, or changed after composing)
    every leaf is pinned. Raises when neither reproduces ``cfg``.
    """
    want = _plain(cfg)
    want["run_dir"] = str(run_dir)
    candidates = []
    if cli_overrides is not None:
        kept = [o for o in cli_overrides if not o.lstrip("+~").startswith("run_dir=")]
        candidates.append(kept + [f"run_dir={_format(str(run_dir))}"])
    candidates.append(exact_overrides(want))
    for overrides in candidates:
        text = shlex.join(overrides)
        if _plain(compose_cfg(text)) == want:
            return text
    raise ValueError(
        "cannot express this config as Hydra overrides of conf/ "
        "(the apps would compose a different experiment)"
    )
