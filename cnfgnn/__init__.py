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

# Idle OpenMP workers spin for a bounded while (GOMP_SPINCOUNT, about tens of microseconds),
# then sleep. libgomp reads this when torch loads, so it takes effect when cnfgnn is imported
# first, as in every cnfgnn entry point and in Flower's app processes. Measured on 2 cores
# (docs/benchmark.md#threads-and-waiting): a Los-loop round 1.3x and a one-client-per-sensor
# round 2x faster than with sleeping workers (OMP_WAIT_POLICY=PASSIVE), which wake too slowly
# for the many small ops; on a machine loaded by other work PASSIVE is about 1.3x faster.
# Set OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself to override.
SPIN_COUNT = "20000"
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

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
