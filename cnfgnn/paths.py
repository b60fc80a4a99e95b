"""Where the package's Hydra configs and bundled data files are, installed or in a checkout.

A wheel carries ``conf/`` as ``cnfgnn/conf/`` and ``data/`` as ``cnfgnn/bundled/``
(``[tool.setuptools.package-dir]`` in pyproject.toml). A source checkout (``pip install -e .``
or ``PYTHONPATH=.``) has them beside the package, at the repository's top level. Both are found
through ``importlib.resources`` on the ``cnfgnn`` package, so no path is built from the
current directory.

Config values name bundled files with the resolver ``${cnfgnn_data:REL}`` (registered when
``cnfgnn`` is imported), e.g. ``speed: ${cnfgnn_data:los_loop/los_speed.csv.gz}``.

Run directories, Flower's home, temporary files and node state never go here: they default to
the current working directory (``work_dir()``).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

ENV_CONF = "CNFGNN_CONF"
RESOLVER = "cnfgnn_data"
_INSTALLED = {"conf": "conf", "data": "bundled"}  # name inside the installed package
_SOURCE = {"conf": "conf", "data": "data"}  # name at the checkout's top level


def _package_dir() -> Path:
    return Path(str(files("cnfgnn")))


def _locate(kind: str, marker: str) -> Path:
    pkg = _package_dir()
    for candidate in (pkg / _INSTALLED[kind], pkg.parent / _SOURCE[kind]):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(
        f"cnfgnn: no {kind} directory with {marker} in {pkg / _INSTALLED[kind]} (installed "
        f"package) or {pkg.parent / _SOURCE[kind]} (source checkout). Fix: reinstall cnfgnn "
        f"from its wheel, or run from a complete checkout"
        + (f" (or set ${ENV_CONF} to a config directory)" if kind == "conf" else "")
    )


def conf_dir() -> Path:
    """The Hydra config directory: ``$CNFGNN_CONF`` if set, else the package's ``conf/``."""
    env = os.environ.get(ENV_CONF)
    return Path(env) if env else _locate("conf", "config.yaml")


def data_dir() -> Path:
    """The bundled data directory (Los-loop, METR-LA/PEMS-BAY graphs; data/README.md)."""
    return _locate("data", "README.md")


def data_file(rel: str) -> str:
    """Absolute path of a bundled data file, ``rel`` relative to :func:`data_dir`.

    The file need not exist: a config is resolved whole (e.g. dumped to a run's
    ``config.yaml``) also where only part of the data is present, such as a Flower app
    bundle, which carries ``data/README.md`` but no data. The loader that opens the path
    names it when it is missing.
    """
    try:
        base = data_dir()
    except FileNotFoundError:
        base = _package_dir() / _INSTALLED["data"]
    return str(base / rel)


def work_dir() -> Path:
    """Where runs keep Flower's home, temporary files and node state: the current directory."""
    return Path.cwd()


def register_resolver() -> None:
    """Register ``${cnfgnn_data:REL}`` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, data_file)
