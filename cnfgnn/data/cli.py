"""``cnfgnn-data``: inspect a dataset, write per-client shards, fetch the authors' archive.

Usage::

    cnfgnn-data info [HYDRA_OVERRIDES...]                  # JSON summary of dataset=...
    cnfgnn-data info dataset=csv dataset.series=my.csv dataset.adjacency=adj.csv
    cnfgnn-data shard [HYDRA_OVERRIDES...] out=DIR nodes_per_client=K
    cnfgnn-data fetch metr-la|pems-bay --sha256 HEX [--url URL] [--dest data/]

``fetch`` needs the archive's SHA-256: none is pinned (the authors publish none; see
cnfgnn/data/fetch.py). Without ``--sha256`` it downloads the archive, keeps it, and prints
its SHA-256 and MD5; compare the MD5 with the Zenodo record page, then run again with
``--sha256``.

Overrides compose ``conf/config.yaml`` (group ``dataset``) exactly as ``cnfgnn`` does.
Errors in the data are printed as one line (file, problem, fix) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from cnfgnn.data.dataset import SensorData
from cnfgnn.data.errors import DataError
from cnfgnn.data.nodes import nodes_per_client
from cnfgnn.data.windows import split_starts

SHARD_KEYS = ("out", "nodes_per_client")


def compose_dataset(overrides: Sequence[str]) -> Any:
    """Compose ``conf/config.yaml`` with ``overrides`` and return its ``dataset`` group."""
    from cnfgnn.shell import compose

    return compose(list(overrides)).dataset  # a bad key: UsageError naming the close keys


def summary(data: SensorData, dataset_cfg: Any) -> dict[str, Any]:
    """JSON-able facts about a dataset: sizes, time span, missing share, graph, edges, windows."""
    from cnfgnn.data.loaders import graph_label

    split = dataset_cfg.split
    starts = split_starts(
        data.num_steps,
        int(dataset_cfg.in_steps),
        int(dataset_cfg.out_steps),
        float(split.train),
        float(split.val),
        float(split.test),
        source=data.where,
    )
    return {
        "name": data.name,
        "kind": str(dataset_cfg.kind),
        "graph": graph_label(dataset_cfg),
        "nodes": data.num_nodes,
        "steps": data.num_steps,
        "interval_minutes": data.interval_minutes,
        "start": str(data.timestamps[0]),
        "end": str(data.timestamps[-1]),
        "missing_fraction": round(data.missing_fraction(), 6),
        "edges": int((data.adjacency != 0).sum()),
        "self_loops": int((data.adjacency.diagonal() != 0).sum()),
        "has_locations": data.locations is not None,
        "windows": {k: int(len(v)) for k, v in starts.items()},
    }


def _split_shard_args(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    overrides, extra = [], {}
    for a in args:
        key = a.split("=", 1)[0]
        if key in SHARD_KEYS and "=" in a:
            extra[key] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    return overrides, extra


def cmd_info(args: Sequence[str]) -> int:
    """Print the JSON summary of the composed dataset."""
    from cnfgnn.data.loaders import load_dataset

    cfg = compose_dataset(args)
    print(json.dumps(summary(load_dataset(cfg), cfg), indent=1))
    return 0


def cmd_shard(args: Sequence[str]) -> int:
    """Write per-client shards of the composed dataset."""
    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.data.shards import write_shards

    overrides, extra = _split_shard_args(args)
    if "out" not in extra:
        raise DataError("cnfgnn-data shard: no output directory. Fix: add out=DIR")
    k = nodes_per_client(extra.get("nodes_per_client", "1"))  # None: all in one shard
    cfg = compose_dataset(overrides)
    out = write_shards(load_dataset(cfg), extra["out"], k)
    manifest = json.loads((out / "manifest.json").read_text())
    print(
        json.dumps(
            {
                "out": str(out),
                "clients": manifest["num_clients"],
                "nodes": manifest["num_nodes"],
                "nodes_per_client": manifest["nodes_per_client"],
            }
        )
    )
    return 0


def cmd_fetch(args: Sequence[str]) -> int:
    """Download and unpack the CNFGNN authors' archive."""
    from cnfgnn.data.fetch import DATASETS, DEFAULT_URL, fetch

    p = argparse.ArgumentParser(prog="cnfgnn-data fetch")
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--dest", default="data")
    p.add_argument(
        "--sha256",
        default=None,
        help="the archive's SHA-256 (required: none is pinned; without it the "
        "archive is downloaded and its SHA-256 and MD5 are printed)",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(list(args))
    target = fetch(a.dataset, url=a.url, dest=a.dest, sha256=a.sha256, progress=not a.no_progress)
    print(
        json.dumps(
            {
                "dataset": a.dataset,
                "dir": str(target),
                "files": sorted(f.name for f in target.iterdir()),
            }
        )
    )
    return 0


COMMANDS = {"info": cmd_info, "shard": cmd_shard, "fetch": cmd_fetch}


def _run(args: list[str]) -> int:
    if not args or args[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[args[0]](args[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 bad input or usage)."""
    from cnfgnn.shell import console

    return console("cnfgnn-data", __doc__, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
