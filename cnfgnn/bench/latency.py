"""Deployment latency on loopback: start-up, round trips and seconds per round, by set-up.

Usage::

    python -m cnfgnn.bench.latency [--supernodes 3 8] [--modes flower warm fast] [--out FILE]

Each (mode, N) runs ``experiment=synthetic_deploy_latency`` (one short CNFGNN round, 2 sensors
per SuperNode) as a real deployment (:mod:`cnfgnn.deploy.launcher`) and records what
``logs/deployment.json`` holds: start-up seconds, mean round-trip seconds per message type,
seconds per round, peak memory and CPU seconds per SuperNode, and the machine's load.

Modes:

* ``flower``: Flower's defaults (``--isolation subprocess``: a new ``flwr-clientapp`` process
  per message; 3 s / 0.5 s / 1 s waits; 30 s heartbeat);
* ``warm``: one long-lived ClientApp process per SuperNode (:mod:`cnfgnn.deploy.clientworker`);
* ``fast``: ``warm`` plus Flower's fixed waits shortened (:mod:`cnfgnn.deploy.fastwaits`), the
  default of ``conf/engine/deployment.yaml``;
* ``flower_fast``: Flower's process per message with the shortened waits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cnfgnn.deploy.launcher import DeployError, deploy_experiment

EXPERIMENT = "synthetic_deploy_latency"
SENSORS_PER_NODE = 2
MODES = {
    "flower": [
        "engine.launch.worker=flower",
        "engine.launch.fast_waits=false",
        "engine.launch.heartbeat_s=null",
    ],
    "warm": [
        "engine.launch.worker=warm",
        "engine.launch.fast_waits=false",
        "engine.launch.heartbeat_s=null",
    ],
    "fast": [],
    "flower_fast": ["engine.launch.worker=flower"],
}


def measure(mode: str, supernodes: int, out_dir: Path, extra: list[str]) -> dict:
    overrides = [
        f"experiment={EXPERIMENT}",
        f"dataset.num_nodes={SENSORS_PER_NODE * supernodes}",
        *MODES[mode],
        *extra,
    ]
    run_dir = out_dir / f"{mode}_{supernodes}"
    t0 = time.monotonic()
    result = deploy_experiment(overrides, run_dir=run_dir, progress=lambda s: print(s, flush=True))
    info = result.info
    nodes = [v for k, v in info["memory_peak_mb"].items() if k.startswith("supernode_")]
    cpu = info.get("cpu_s", {})
    return {
        "mode": mode,
        "supernodes": supernodes,
        "overrides": overrides,
        "wall_s": time.monotonic() - t0,
        "startup_s": info["startup_s"],
        "run_s": info["run_s"],
        "round_trip_s": info["round_trip_s"],
        "round_trips": info["round_trips"],
        "seconds_per_round": info["seconds_per_round"],
        "supernode_pss_mb_max": max(v["pss_mb"] for v in nodes),
        "supernode_rss_mb_max": max(v["rss_mb"] for v in nodes),
        "supernode_processes_max": max(v["processes"] for v in nodes),
        "superlink_pss_mb": info["memory_peak_mb"].get("superlink", {}).get("pss_mb"),
        "cpu_s_supernodes": sum(v for k, v in cpu.items() if k.startswith("supernode_")),
        "cpu_s": cpu,
        "load": info["load"],
        "test_rmse": result.final["test"]["rmse"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cnfgnn.bench.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--supernodes", type=int, nargs="+", default=[3, 8])
    p.add_argument("--modes", nargs="+", default=["flower", "warm", "fast"], choices=sorted(MODES))
    p.add_argument("--out", type=Path, default=Path("outputs") / "deploy" / "latency")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = a.out / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in a.supernodes:
        for mode in a.modes:
            print(f"== {mode}, {n} SuperNodes (load {os.getloadavg()})", flush=True)
            try:
                rows.append(measure(mode, n, out_dir, a.overrides))
            except DeployError as e:
                rows.append({"mode": mode, "supernodes": n, "error": str(e)})
            (out_dir / "latency.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:>12} N={r['supernodes']}: {r['error']}")
            continue
        rt = r["round_trip_s"]
        print(
            f"{r['mode']:>12} N={r['supernodes']}: start-up {r['startup_s']:.1f} s, round "
            f"{r['seconds_per_round'][0]:.1f} s, split trip {rt.get('train.split', 0):.2f} s, "
            f"embed trip {rt.get('query.embed', 0):.2f} s, SuperNode PSS "
            f"{r['supernode_pss_mb_max']:.0f} MB, load {r['load']['start'][0]:.1f}"
        )
    print(f"written: {out_dir / 'latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
