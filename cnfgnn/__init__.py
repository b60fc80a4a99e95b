"""cnfgnn: Cross-Node Federated Graph Neural Network for spatio-temporal forecasting."""

import os as _os

# Idle OpenMP workers sleep instead of spinning (libgomp reads this when torch loads, so it
# only takes effect when cnfgnn is imported first, as in every cnfgnn entry point and in
# Flower's app processes). On a 2-core machine shared with other work, spinning workers
# steal the cores the computing thread needs: `cnfgnn-bench` measured a one-client-per-
# sensor round 10x faster with it. Set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

try:  # the installed distribution's version (pyproject.toml [project].version)
    __version__: str = _version("cnfgnn")
except _PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0.2.0"

# `${cnfgnn_data:REL}` in conf/ names a file bundled with the package (cnfgnn/paths.py).
from cnfgnn.paths import register_resolver as _register_resolver  # noqa: E402

_register_resolver()
