r"""Cost of secure aggregation: the FedAvg phase with and without SecAgg+ (docs/privacy.md).

Usage::

    python -m cnfgnn.bench.secagg --out outputs/bench/secagg --clients 8,32 -- \
        dataset.num_nodes=32 dataset.days=2 federation.rounds=2

For every client count ``n`` it runs ``cnfgnn`` twice in Flower simulation under
``privacy=dp`` (node-side noise, ``federation.scaling=per_node``): once with
``privacy.secagg=false`` (one ``train.local`` round trip per FedAvg phase) and once with
``privacy.secagg=true`` (SecAgg+'s four round trips). The dataset's nodes are spread over
the ``n`` clients (``federation.nodes_per_client = num_nodes / n``). One run at a time,
each a child process stopped by its PID. From each run's ``final.json`` it reads the
FedAvg phase's seconds (``seconds["local"]``, local training included) and the bytes
Flower serialised for the phase's message types (``wire_bytes``), per round. Writes
``secagg_bench.csv`` and ``secagg_bench.md`` under ``--out`` with the load average before
and after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cnfgnn import tables
from cnfgnn.procs import ProcessSet, cnfgnn_run_command, split_overrides

LOCAL_TYPE = "train.local"  # cnfgnn.federation.protocol.LOCAL_TRAIN
SECAGG_TYPE = "train"  # legacy message type of Flower's SecAgg+ workflow


def run_overrides(clients: int, num_nodes: int, secagg: bool) -> list[str]:
    """Overrides of one case: ``clients`` clients over ``num_nodes`` nodes, SecAgg+ on/off."""
    if num_nodes % clients:
        raise ValueError(
            f"{num_nodes} nodes cannot be split evenly over {clients} clients; "
            "fix: pick --clients that divide dataset.num_nodes"
        )
    return [
        "engine=simulation",
        "privacy=dp",
        "federation.scaling=per_node",
        f"federation.nodes_per_client={num_nodes // clients}",
        f"privacy.secagg={'true' if secagg else 'false'}",
    ]


def phase_row(final: dict[str, Any]) -> dict[str, Any]:
    """The FedAvg phase's per-round seconds and serialised bytes of one run's ``final.json``."""
    rounds = int(final["rounds_run"])
    wire = final.get("wire_bytes", {})
    kind = SECAGG_TYPE if final["privacy"]["fedavg"].get("secagg") else LOCAL_TYPE
    w = wire.get(kind, {})
    return {
        "rounds": rounds,
        "fedavg_s_per_round": final["seconds"].get("local", 0.0) / rounds,
        "fedavg_down_bytes_per_round": w.get("down", 0) / rounds,
        "fedavg_up_bytes_per_round": w.get("up", 0) / rounds,
        "message_type": kind,
        "test_rmse": final["test"]["rmse"],
    }


def main(argv: list[str] | None = None) -> int:
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--clients", default="8,32", help="comma-separated client counts")
    ap.add_argument("--num-nodes", type=int, default=32, help="dataset.num_nodes of the runs")
    a = ap.parse_args(args)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = ProcessSet(out, dict(os.environ))
    rows: list[dict[str, Any]] = []
    try:
        for clients in [int(c) for c in a.clients.split(",") if c.strip()]:
            for sa in (False, True):
                name = f"clients{clients}_secagg{int(sa)}"
                run_dir = out / name
                run_dir.mkdir(parents=True, exist_ok=True)
                cmd = cnfgnn_run_command(
                    [f"dataset.num_nodes={a.num_nodes}", *overrides]
                    + run_overrides(clients, a.num_nodes, sa),
                    run_dir,
                )
                load0 = os.getloadavg()
                t0 = time.perf_counter()
                proc = procs.start(name, cmd, cwd=Path.cwd(), log_path=run_dir / "bench.log")
                print(f"[{name}] pid {proc.pid}, load {load0[0]:.2f}", flush=True)
                rc = proc.popen.wait()
                row: dict[str, Any] = {
                    "clients": clients,
                    "secagg": sa,
                    "returncode": rc,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "load_before": "/".join(f"{x:.2f}" for x in load0),
                    "load_after": "/".join(f"{x:.2f}" for x in os.getloadavg()),
                }
                final_path = run_dir / "final.json"
                if rc == 0 and final_path.is_file():
                    row.update(phase_row(json.loads(final_path.read_text())))
                print(f"[{name}] {row}", flush=True)
                rows.append(row)
    finally:
        procs.stop_all()
    keys = [
        "clients",
        "secagg",
        "returncode",
        "wall_s",
        "load_before",
        "load_after",
        "rounds",
        "fedavg_s_per_round",
        "fedavg_down_bytes_per_round",
        "fedavg_up_bytes_per_round",
        "message_type",
        "test_rmse",
    ]
    tables.write_csv(rows, keys, out / "secagg_bench.csv")
    shown = [
        "clients",
        "secagg",
        "fedavg_s_per_round",
        "fedavg_down_bytes_per_round",
        "fedavg_up_bytes_per_round",
        "wall_s",
        "load_before",
        "load_after",
    ]
    (out / "secagg_bench.md").write_text("\n".join(tables.markdown(rows, shown)) + "\n")
    print((out / "secagg_bench.md").read_text())
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
