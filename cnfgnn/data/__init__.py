"""cnfgnn.data: loaders, the synthetic road network, windows, scalers, node selection, shards.

Names are imported lazily, so ``import cnfgnn.data.windows`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SensorData": "dataset",
    "DataError": "errors",
    "load_dataset": "loaders",
    "load_adj_pkl": "dcrnn",
    "load_dcrnn_h5": "dcrnn",
    "load_dcrnn_npz": "dcrnn",
    "load_csv": "tabular",
    "load_los_loop": "tabular",
    "load_metrla_json": "tabular",
    "generate_synthetic": "synthetic",
    "split_starts": "windows",
    "gather_windows": "windows",
    "Scaler": "scaler",
    "input_stats": "scaler",
    "global_scaler": "scaler",
    "per_node_scaler": "scaler",
    "select_nodes": "nodes",
    "partition": "nodes",
    "NodeShard": "shards",
    "write_shards": "shards",
    "load_shard": "shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cnfgnn.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cnfgnn.data.{_EXPORTS[name]}"), name)
