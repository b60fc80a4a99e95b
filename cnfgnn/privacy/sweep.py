r"""Accuracy against noise level: one ``cnfgnn`` run per noise multiplier (docs/privacy.md).

Usage::

    python -m cnfgnn.privacy.sweep --out outputs/privacy/synthetic \\
        --levels none,0,0.5,1,2 --parallel 2 -- experiment=synthetic_cnfgnn federation.rounds=2

``none`` is the run without DP (``privacy=none``); a number ``s`` is ``privacy=dp`` with the
noise multiplier of all three mechanisms (``h_c``, ``dL/dh_G``, FedAvg) set to ``s`` and
the clip norms of ``conf/privacy/dp.yaml`` (override them after ``--``). ``0`` clips
without noise (epsilon unbounded). Epsilon is finite only with ``federation.scaling=per_node``
after ``--`` (the global scaler's statistics go up without noise; docs/privacy.md), and the
noise is OS-random, so two sweeps give different numbers (run several seeds). Each run is a
child process (``python -m cnfgnn.cli``),
started and stopped by its PID; its ``final.json`` gives test RMSE/MAE and epsilon.
Writes ``privacy_sweep.csv``, ``privacy_sweep.md`` and ``privacy_sweep.png`` (test RMSE
and epsilon against the noise multiplier) under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from cnfgnn.procs import Proc, ProcessSet, cnfgnn_run_command

MECHANISMS = ("h_c", "grad", "fedavg")


def level_overrides(level: str) -> list[str]:
    """Hydra overrides of one noise level (``none`` or a noise multiplier)."""
    if level == "none":
        return ["privacy=none"]
    s = float(level)
    return ["privacy=dp"] + [f"privacy.{m}.noise_multiplier={s}" for m in MECHANISMS]


def _row(level: str, run_dir: Path, rc: int, seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "noise_multiplier": level,
        "returncode": rc,
        "seconds": round(seconds, 1),
        "run_dir": str(run_dir),
    }
    final_path = run_dir / "final.json"
    if rc != 0 or not final_path.is_file():
        return row
    final = json.loads(final_path.read_text())
    test = final["test"]
    row.update(
        test_rmse=test["rmse"],
        test_mae=test["mae"],
        test_masked_mae=test.get("masked_mae"),
        rounds=final.get("rounds_run"),
    )
    pr = final.get("privacy")
    if pr is None:
        row.update(epsilon="no DP", delta="")
    else:
        eps = pr["epsilon"]
        row.update(
            epsilon=math.inf if eps is None else eps,
            delta=pr["delta"],
            clip_h_c=pr["mechanisms"]["h_c"]["clip"],
            clip_grad=pr["mechanisms"]["grad"]["clip"],
            clip_fedavg=pr["mechanisms"]["fedavg"]["clip"],
            releases=json.dumps(pr["releases_per_window"], sort_keys=True),
        )
    return row


def run_levels(
    levels: list[str], overrides: list[str], out: Path, parallel: int
) -> list[dict[str, Any]]:
    """Run every level (at most ``parallel`` at once); returns one row per level."""
    pending = list(levels)
    procs = ProcessSet(out, dict(os.environ))
    running: dict[str, tuple[Proc, Path, float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                level = pending.pop(0)
                run_dir = out / f"noise_{level}"
                run_dir.mkdir(parents=True, exist_ok=True)
                cmd = cnfgnn_run_command([*overrides, *level_overrides(level)], run_dir)
                proc = procs.start(level, cmd, cwd=Path.cwd(), log_path=run_dir / "sweep.log")
                print(f"[{level}] started pid {proc.pid}: {run_dir}", flush=True)
                running[level] = (proc, run_dir, time.perf_counter())
            time.sleep(2.0)
            for level, (proc, run_dir, t0) in list(running.items()):
                if proc.alive():
                    continue
                rows[level] = _row(level, run_dir, proc.popen.returncode, time.perf_counter() - t0)
                print(f"[{level}] finished: {rows[level]}", flush=True)
                del running[level]
    finally:  # stop exactly the process groups this sweep started
        for level in running:
            procs.kill(level)
    return [rows[level] for level in levels if level in rows]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def write_outputs(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """``privacy_sweep.csv``, ``.md`` (table) and ``.png`` (RMSE and epsilon vs noise)."""
    keys = [
        "noise_multiplier",
        "epsilon",
        "delta",
        "test_rmse",
        "test_mae",
        "test_masked_mae",
        "rounds",
        "seconds",
        "clip_h_c",
        "clip_grad",
        "clip_fedavg",
        "releases",
        "returncode",
        "run_dir",
    ]
    with open(out / "privacy_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    shown = ["noise_multiplier", "epsilon", "delta", "test_rmse", "test_mae", "rounds", "seconds"]
    lines = [f"**{title}**", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in shown) + " |")
    (out / "privacy_sweep.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_rows = [r for r in rows if r["noise_multiplier"] != "none" and "test_rmse" in r]
    base = [r for r in rows if r["noise_multiplier"] == "none" and "test_rmse" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [float(r["noise_multiplier"]) for r in dp_rows]
    ax[0].plot(xs, [r["test_rmse"] for r in dp_rows], "o-", label="DP (clipped + noised)")
    if base:
        ax[0].axhline(base[0]["test_rmse"], color="gray", ls="--", label="no DP")
    ax[0].set_xlabel("noise multiplier (all mechanisms)")
    ax[0].set_ylabel("test RMSE (unmasked)")
    ax[0].legend()
    ax[0].set_title(title)
    finite = [
        (x, r["epsilon"])
        for x, r in zip(xs, dp_rows)
        if isinstance(r.get("epsilon"), float) and math.isfinite(r["epsilon"])
    ]
    if finite:
        ax[1].plot([x for x, _ in finite], [e for _, e in finite], "o-", color="C3")
        ax[1].set_yscale("log")
    delta = next((r["delta"] for r in dp_rows if r.get("delta") not in (None, "")), None)
    ax[1].set_xlabel("noise multiplier (all mechanisms)")
    ax[1].set_ylabel(f"epsilon at delta={delta:g}" if delta else "epsilon")
    ax[1].set_title("privacy spent (Opacus RDP); sigma=0: unbounded")
    fig.tight_layout()
    fig.savefig(out / "privacy_sweep.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, overrides = args[:i], args[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument(
        "--levels",
        default="none,0,0.5,1,2",
        help="comma-separated noise multipliers; 'none' = no DP",
    )
    ap.add_argument("--parallel", type=int, default=1, help="runs at once")
    ap.add_argument("--title", default=None)
    a = ap.parse_args(args)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [s.strip() for s in a.levels.split(",") if s.strip()]
    rows = run_levels(levels, overrides, out, max(1, a.parallel))
    write_outputs(rows, out, a.title or " ".join(overrides))
    print((out / "privacy_sweep.md").read_text())
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
