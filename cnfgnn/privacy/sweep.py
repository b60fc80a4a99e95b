r"""Accuracy against noise level: one ``cnfgnn`` run per noise multiplier (docs/privacy.md).

Usage::

    python -m cnfgnn.privacy.sweep --out outputs/privacy/synthetic \\
        --levels none,0,0.5,1,2 --parallel 2 -- experiment=synthetic_cnfgnn federation.rounds=2

``--seeds 42,43,44`` runs every level once per seed (``seed=...``); the outputs then hold
one row per (level, seed) and a mean ± std row per level (sample std over the seeds).
``none`` is the run without DP (``privacy=none``); a number ``s`` is ``privacy=dp`` with the
noise multiplier of all three mechanisms (``h_c``, ``dL/dh_G``, FedAvg) set to ``s`` and
the clip norms of ``conf/privacy/dp.yaml`` (override them after ``--``). ``0`` clips
without noise (epsilon unbounded). Epsilon is finite only with ``federation.scaling=per_node``
after ``--`` (the global scaler's statistics go up without noise; docs/privacy.md), and the
noise is OS-random, so two sweeps give different numbers (run several seeds). Each run is a
child process (``python -m cnfgnn.cli``),
started and stopped by its PID; its ``final.json`` gives test RMSE/MAE and epsilon.
Writes ``privacy_sweep.csv``, ``privacy_sweep.md`` and ``privacy_sweep.png`` (test RMSE
and epsilon against the noise multiplier) under ``--out``. Epsilon is given as run and as
the same releases would give with ``privacy.secagg=true`` (``epsilon_with_secagg`` of
``final.json``: the server sees only the FedAvg sum). ``--collect`` runs nothing and
rebuilds these files from the runs already under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from cnfgnn import tables
from cnfgnn.procs import Proc, ProcessSet, cnfgnn_run_command, split_overrides

MECHANISMS = ("h_c", "grad", "fedavg")


def level_overrides(level: str) -> list[str]:
    """Hydra overrides of one noise level (``none`` or a noise multiplier)."""
    if level == "none":
        return ["privacy=none"]
    s = float(level)
    return ["privacy=dp"] + [f"privacy.{m}.noise_multiplier={s}" for m in MECHANISMS]


def _secagg_epsilon(pr: dict[str, Any]) -> float | str:
    """``epsilon_with_secagg`` of a run's privacy block: inf where unbounded, ``n/a`` with
    server-side noise (SecAgg+ cannot apply), empty for a run that did not report it."""
    if (pr.get("fedavg") or {}).get("noise_at") == "server":
        return "n/a"
    if "epsilon_with_secagg" not in pr:
        return ""
    eps = pr["epsilon_with_secagg"]
    return math.inf if eps is None else eps


def _row(
    level: str, seed: int | None, run_dir: Path, rc: int, seconds: float | None = None
) -> dict[str, Any]:
    """One run's row; ``seconds`` None: the run's own ``seconds_total`` (``--collect``)."""
    row: dict[str, Any] = {
        "noise_multiplier": level,
        "seed": "" if seed is None else seed,
        "returncode": rc,
        "seconds": None if seconds is None else round(seconds, 1),
        "run_dir": str(run_dir),
    }
    final_path = run_dir / "final.json"
    if rc != 0 or not final_path.is_file():
        return row
    final = json.loads(final_path.read_text())
    if seconds is None:
        row["seconds"] = round(float(final.get("seconds_total") or 0.0), 1)
    test = final["test"]
    row.update(
        test_rmse=test["rmse"],
        test_mae=test["mae"],
        test_masked_mae=test.get("masked_mae"),
        rounds=final.get("rounds_run"),
    )
    pr = final.get("privacy")
    if pr is None:
        row.update(epsilon="no DP", epsilon_secagg="no DP", delta="")
    else:
        eps = pr["epsilon"]
        row.update(
            epsilon=math.inf if eps is None else eps,
            epsilon_secagg=_secagg_epsilon(pr),
            delta=pr["delta"],
            clip_h_c=pr["mechanisms"]["h_c"]["clip"],
            clip_grad=pr["mechanisms"]["grad"]["clip"],
            clip_fedavg=pr["mechanisms"]["fedavg"]["clip"],
            releases=json.dumps(pr["releases_per_window"], sort_keys=True),
        )
    return row


#: A sweep's run folders: ``<out>/noise_<level>`` or ``<out>/noise_<level>/seed_<k>``.
LEVEL_PREFIX, SEED_PREFIX = "noise_", "seed_"


def run_folder(out: Path, level: str, seed: int | None) -> Path:
    """Where the run of ``level`` (and ``seed``) writes; :func:`collect` reads it back."""
    level_dir = out / f"{LEVEL_PREFIX}{level}"
    return level_dir if seed is None else level_dir / f"{SEED_PREFIX}{seed}"


def run_levels(
    levels: list[str],
    overrides: list[str],
    out: Path,
    parallel: int,
    seeds: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Run every level (once per seed when ``seeds`` is given; at most ``parallel`` at
    once); returns one row per (level, seed), in that order."""
    jobs = [(lv, sd) for lv in levels for sd in (seeds or [None])]
    pending = list(jobs)
    procs = ProcessSet(out, dict(os.environ))
    running: dict[str, tuple[Proc, Path, float, tuple[str, int | None]]] = {}
    rows: dict[tuple[str, int | None], dict[str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                level, seed = pending.pop(0)
                name = level if seed is None else f"{level}_seed{seed}"
                run_dir = run_folder(out, level, seed)
                run_dir.mkdir(parents=True, exist_ok=True)
                extra = [] if seed is None else [f"seed={seed}"]
                cmd = cnfgnn_run_command([*overrides, *extra, *level_overrides(level)], run_dir)
                proc = procs.start(name, cmd, cwd=Path.cwd(), log_path=run_dir / "sweep.log")
                print(f"[{name}] started pid {proc.pid}: {run_dir}", flush=True)
                running[name] = (proc, run_dir, time.perf_counter(), (level, seed))
            time.sleep(2.0)
            for name, (proc, run_dir, t0, key) in list(running.items()):
                if proc.alive():
                    continue
                rc = proc.popen.returncode
                rows[key] = _row(*key, run_dir, rc, time.perf_counter() - t0)
                print(f"[{name}] finished: {rows[key]}", flush=True)
                del running[name]
    finally:  # stop exactly the process groups this sweep started
        for name in running:
            procs.kill(name)
    return [rows[k] for k in jobs if k in rows]


def collect(out: Path) -> list[dict[str, Any]]:
    """The rows of the runs a sweep left under ``out`` (``noise_<level>[/seed_<k>]``), levels
    in the order none, then increasing noise; ``seconds`` is each run's own
    ``seconds_total`` (the process's wall time is not kept). Folders whose level or seed is
    not a number are not a sweep's and are skipped."""

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    levels = {d: d.name[len(LEVEL_PREFIX) :] for d in out.glob(f"{LEVEL_PREFIX}*") if d.is_dir()}
    levels = {d: lv for d, lv in levels.items() if lv == "none" or number(lv) is not None}
    rows = []
    for level_dir in sorted(
        levels, key=lambda d: -1.0 if levels[d] == "none" else float(levels[d])
    ):
        seeds = {d: d.name[len(SEED_PREFIX) :] for d in level_dir.glob(f"{SEED_PREFIX}*")}
        runs: list[tuple[int | None, Path]] = [
            (int(sd), d)
            for d, sd in sorted(seeds.items(), key=lambda x: x[1].zfill(12))
            if sd.isdigit()
        ]
        for seed, run_dir in runs or [(None, level_dir)]:
            done = (run_dir / "final.json").is_file()
            rows.append(_row(levels[level_dir], seed, run_dir, 0 if done else 1))
    return rows


#: Columns averaged over seeds in a level's mean row (each gets ``<column>_std``).
AVERAGED = ("epsilon", "epsilon_secagg", "test_rmse", "test_mae", "test_masked_mae", "seconds")


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per level over its seeds: the mean of every :data:`AVERAGED` column and its
    sample standard deviation (``<column>_std``, None for one seed; epsilon, the same for
    every seed when the rounds are, is given once without a spread); ``seed`` is empty and
    ``seeds`` counts the runs that finished. A level whose runs all failed is left out."""
    out: list[dict[str, Any]] = []
    for level in dict.fromkeys(r["noise_multiplier"] for r in rows):
        done = [r for r in rows if r["noise_multiplier"] == level and "test_rmse" in r]
        if not done:
            continue
        m: dict[str, Any] = {"noise_multiplier": level, "seed": "", "seeds": len(done)}
        for k in ("delta", "rounds", "clip_h_c", "clip_grad", "clip_fedavg", "releases"):
            m[k] = done[0].get(k, "")
        for k in AVERAGED:
            vals = [r.get(k) for r in done]
            if any(not isinstance(v, (int, float)) for v in vals):
                m[k] = vals[0]  # "no DP"
                m[f"{k}_std"] = None
                continue
            x = [float(v) for v in vals]
            mean = sum(x) / len(x)
            m[k] = mean
            if k.startswith("epsilon") and max(x) - min(x) <= 1e-9 * abs(mean):
                m[k], m[f"{k}_std"] = x[0], None  # the accountant's: the same for every seed
                continue
            if len(x) > 1 and all(math.isfinite(v) for v in x):
                m[f"{k}_std"] = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
            else:
                m[f"{k}_std"] = None
        out.append(m)
    return out


def write_outputs(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """``privacy_sweep.csv``, ``.md`` (table) and ``.png`` (RMSE and epsilon vs noise).

    With several seeds the CSV keeps the per-seed rows and adds a mean row per level
    (empty ``seed``); the table and the plot show the mean rows, ``mean ± std``."""
    means = mean_rows(rows)
    seeded = any(r.get("seed") != "" for r in rows)
    keys = [
        "noise_multiplier",
        "seed",
        "seeds",
        "epsilon",
        "epsilon_std",
        "epsilon_secagg",
        "epsilon_secagg_std",
        "delta",
        "test_rmse",
        "test_rmse_std",
        "test_mae",
        "test_mae_std",
        "test_masked_mae",
        "test_masked_mae_std",
        "rounds",
        "seconds",
        "seconds_std",
        "clip_h_c",
        "clip_grad",
        "clip_fedavg",
        "releases",
        "returncode",
        "run_dir",
    ]
    tables.write_csv(rows + (means if seeded else []), keys, out / "privacy_sweep.csv")
    shown_rows = means if seeded else rows
    shown = [
        "noise_multiplier",
        "epsilon",
        "epsilon_secagg",
        "delta",
        "test_rmse",
        "test_mae",
        "rounds",
        "seconds",
    ]
    if seeded:
        shown.insert(1, "seeds")
    lines = [f"**{title}**", "", *tables.markdown(shown_rows, shown)]
    failed = [r for r in rows if r.get("returncode") != 0]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed: " + ", ".join(r["run_dir"] for r in failed)]
    (out / "privacy_sweep.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_rows = [r for r in shown_rows if r["noise_multiplier"] != "none" and "test_rmse" in r]
    base = [r for r in shown_rows if r["noise_multiplier"] == "none" and "test_rmse" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [float(r["noise_multiplier"]) for r in dp_rows]
    ax[0].errorbar(
        xs,
        [r["test_rmse"] for r in dp_rows],
        yerr=[r.get("test_rmse_std") or 0.0 for r in dp_rows],
        fmt="o-",
        capsize=3,
        label="DP (clipped + noised)" + (", mean ± std over seeds" if seeded else ""),
    )
    if base:
        ax[0].axhline(base[0]["test_rmse"], color="gray", ls="--", label="no DP")
    ax[0].set_xlabel("noise multiplier (all mechanisms)")
    ax[0].set_ylabel("test RMSE (unmasked)")
    ax[0].legend()
    ax[0].set_title(title)
    for key, label, color in (
        ("epsilon", "as run", "C3"),
        ("epsilon_secagg", "with SecAgg+", "C2"),
    ):
        finite = [
            (x, r[key])
            for x, r in zip(xs, dp_rows)
            if isinstance(r.get(key), float) and math.isfinite(r[key])
        ]
        if finite:
            ax[1].plot(
                [x for x, _ in finite], [e for _, e in finite], "o-", color=color, label=label
            )
            ax[1].set_yscale("log")
            ax[1].legend()
    delta = next((r["delta"] for r in dp_rows if r.get("delta") not in (None, "")), None)
    ax[1].set_xlabel("noise multiplier (all mechanisms)")
    ax[1].set_ylabel(f"epsilon at delta={delta:g}" if delta else "epsilon")
    ax[1].set_title("privacy spent (Opacus RDP); sigma=0: unbounded")
    fig.tight_layout()
    fig.savefig(out / "privacy_sweep.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument(
        "--levels",
        default="none,0,0.5,1,2",
        help="comma-separated noise multipliers; 'none' = no DP",
    )
    ap.add_argument("--parallel", type=int, default=1, help="runs at once")
    ap.add_argument(
        "--seeds", default=None, help="comma-separated seeds, e.g. 42,43,44 (mean ± std per level)"
    )
    ap.add_argument("--title", default=None)
    ap.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: rebuild the outputs from the runs already under --out",
    )
    a = ap.parse_args(args)
    out = Path(a.out)
    if a.collect:
        rows = collect(out)
        if not rows:
            print(
                f"sweep: no run under {out} (noise_<level>/[seed_<k>/]final.json)", file=sys.stderr
            )
            return 2
    else:
        out.mkdir(parents=True, exist_ok=True)
        levels = [s.strip() for s in a.levels.split(",") if s.strip()]
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()] if a.seeds else None
        rows = run_levels(levels, overrides, out, max(1, a.parallel), seeds)
    write_outputs(rows, out, a.title or " ".join(overrides))
    print((out / "privacy_sweep.md").read_text())
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
