"""Modules that share a name with an API function stay callable as that function.

``cnfgnn.compare`` and ``cnfgnn.forecast`` are both modules (the commands) and functions of
the Python API (:mod:`cnfgnn.api`). Importing a submodule binds its name on the package,
so after ``import cnfgnn.forecast.cli`` the attribute ``cnfgnn.forecast`` is the module; with
:func:`make_callable` calling it still runs the API function.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    _api_name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("cnfgnn.api"), self._api_name)(*args, **kwargs)


def make_callable(module_name: str, api_name: str) -> None:
    """Calling module ``module_name`` calls ``cnfgnn.api.<api_name>``."""
    module = sys.modules[module_name]
    module.__class__ = _CallableModule
    module._api_name = api_name  # type: ignore[attr-defined]
