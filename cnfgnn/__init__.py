"""cnfgnn: Cross-Node Federated Graph Neural Network for spatio-temporal forecasting.

The Python API (:mod:`cnfgnn.api`, ``docs/api.md``) is imported on first use, so
``import cnfgnn`` stays light (no torch, no Flower)::

    cfg = cnfgnn.compose(["experiment=synthetic_cnfgnn", "federation.rounds=2"])
    run = cnfgnn.train(cfg)
"""

from __future__ import annotations

import importlib
import os as _os
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

from cnfgnn.paths import register_resolver as _register_resolver

# Idle OpenMP workers sleep instead of spinning (libgomp reads this when torch loads, so it
# only takes effect when cnfgnn is imported first, as in every cnfgnn entry point and in
# Flower's app processes). On a 2-core machine shared with other work, spinning workers
# steal the cores the computing thread needs: `cnfgnn-bench` measured a one-client-per-
# sensor round 10x faster with it. Set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # the installed distribution's version (pyproject.toml [project].version)
    __version__: str = _version("cnfgnn")
except _PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0.2.0"

# `${cnfgnn_data:REL}` in conf/ names a file bundled with the package (cnfgnn/paths.py).
_register_resolver()

__all__ = ["Run", "__version__", "compare", "compose", "forecast", "load_run", "train"]

if TYPE_CHECKING:
    from cnfgnn.api import Run, compare, compose, forecast, load_run, train


#: API names that are also modules (the commands): the module, callable as the function
#: (``from cnfgnn import compare`` must still give the module).
_MODULES = ("compare", "forecast")


def __getattr__(name: str) -> Any:
    """The API's names, imported from :mod:`cnfgnn.api` when first used."""
    if name in _MODULES:
        return importlib.import_module(f"cnfgnn.{name}")
    if name in __all__:
        return getattr(importlib.import_module("cnfgnn.api"), name)
    raise AttributeError(f"module 'cnfgnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
