"""``cnfgnn-compare``: CNFGNN and the paper's baselines on one dataset, one budget, one seed.

Usage::

    cnfgnn-compare                                       # conf/compare/default.yaml on synthetic
    cnfgnn-compare dataset=los_loop federation.nodes_per_client=207 compare.budget_epochs=5
    cnfgnn-compare dataset=csv dataset.path=my.csv dataset.graph=my_graph.npz compare.run=all

Arguments starting with ``compare.`` set keys of ``conf/compare/default.yaml``; every other
argument is a Hydra override given to every run. Each method is its config preset (the
``methods`` map) plus ``federation.rounds = ceil(budget_epochs / R_c)``, so all methods train
the same number of local epochs per node. Each runs as its own ``cnfgnn`` process (its
memory is measured alone and a failing method does not stop the others) into
``<out>/<method>/``, its log in ``<out>/<method>/compare.log``. A method whose
``final.json`` is already in ``out`` is not rerun (``compare.force=true`` reruns it), so
an interrupted comparison continues where it stopped. At the end :mod:`cnfgnn.report`
writes ``comparison.{csv,md}`` and the plots into ``out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnfgnn.cli import CONF_DIR
from cnfgnn.shell import UsageError, did_you_mean


def compare_config(args: list[str]) -> tuple[DictConfig, list[str]]:
    """Split ``args`` into the compare settings and the overrides for every run."""
    conf = OmegaConf.load(Path(CONF_DIR) / "compare" / "default.yaml")
    ours = [a[len("compare."):] for a in args if a.startswith("compare.")]
    runs = [a for a in args if not a.startswith("compare.")]
    conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(ours))
    known = ("run", "budget_epochs", "patience", "out", "force", "methods")
    unknown = sorted(set(conf.keys()) - set(known))
    if unknown:
        raise UsageError(f"unknown setting(s) {['compare.' + u for u in unknown]}."
                         f"{did_you_mean('compare.' + unknown[0], ['compare.' + k for k in known])}"
                         " See conf/compare/default.yaml")
    names = list(conf.methods) if conf.run in ("all", ["all"]) else list(conf.run)
    bad = [m for m in names if m not in conf.methods]
    if bad:
        raise UsageError(f"unknown method(s) {bad}.{did_you_mean(bad[0], list(conf.methods))} "
                         f"Known: {list(conf.methods)}")
    conf.run = names
    if int(conf.budget_epochs) < 1:
        raise UsageError("compare.budget_epochs must be at least 1")
    return conf, runs


def compose_run(overrides: list[str]) -> DictConfig:
    """The composed config a ``cnfgnn`` run with ``overrides`` would get."""
    from cnfgnn.shell import compose

    return compose(overrides)


def plan(conf: DictConfig, runs: list[str]) -> dict[str, list[str]]:
    """Method -> the full override list of its run (rounds set from the budget).

    Composing each config here checks every override before any training starts.
    """
    plans: dict[str, list[str]] = {}
    for name in conf.run:
        base = [*conf.methods[name].overrides, *runs]
        try:
            cfg = compose_run(base)
        except UsageError as err:  # a bad override: say which method and why, before training
            raise UsageError(f"the overrides of {name} do not compose: {err}") from None
        budget, rc = int(conf.budget_epochs), max(1, int(cfg.federation.local_epochs))
        # the largest R_c <= the preset's that divides the budget, so every method trains
        # exactly budget_epochs local epochs per node (e.g. GRU local: 5 a round, budget 2 -> 2)
        rc_used = max(d for d in range(1, rc + 1) if budget % d == 0)
        extra = [f"federation.rounds={budget // rc_used}", f"name=compare_{name}"]
        if rc_used != rc:
            extra.append(f"federation.local_epochs={rc_used}")
        if conf.patience is not None:
            extra.append(f"federation.early_stopping_patience={int(conf.patience)}")
        plans[name] = [*base, *extra]
    return plans


def _out_dir(conf: DictConfig, runs: list[str]) -> Path:
    if conf.out:
        return Path(str(conf.out))
    cfg = compose_run(runs)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(str(cfg.output_root)) / "compare" / f"{cfg.dataset.name}_{stamp}"


def run_method(name: str, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Run one method as a ``cnfgnn`` process, streaming its output; returns its record."""
    if run_dir.exists():  # an earlier, unfinished (or forced) try: kept aside, not deleted
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.prev-{datetime.now():%Y%m%d-%H%M%S}"))
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "cnfgnn.cli", *overrides, f"run_dir={run_dir}",
           f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    start = time.perf_counter()
    with open(run_dir / "compare.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                print(f"[{name}] {line}", end="", flush=True)
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: stop exactly the process we started, then re-raise
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"method": name, "returncode": proc.returncode,
            "seconds_wall": time.perf_counter() - start,
            "peak_rss_mb": usage.ru_maxrss / 1024.0, "overrides": overrides}


class Interrupted(Exception):
    """Ctrl-C during a method: its process was stopped; finished methods are kept."""

    def __init__(self, method: str, out: Path):
        super().__init__(method, out)
        self.method, self.out = method, out


def run(args: list[str]) -> tuple[Path, str, list[Path], list[str]]:
    """Run the comparison ``args`` ask for: ``(out dir, table, report files, failed methods)``.

    Raises:
        UsageError: bad settings or overrides (nothing has run).
        Interrupted: Ctrl-C (the running method's process was stopped).
    """
    conf, runs = compare_config(args)
    plans = plan(conf, runs)
    out = _out_dir(conf, runs)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "compare.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"methods": {}}
    manifest.update({"budget_epochs": int(conf.budget_epochs), "overrides": runs,
                     "labels": {k: str(v.label) for k, v in conf.methods.items()}})
    print(f"cnfgnn-compare: {len(plans)} methods, {conf.budget_epochs} local epochs per node "
          f"each, output {out}")
    failed = []
    for i, (name, overrides) in enumerate(plans.items(), 1):
        run_dir = out / name
        if (run_dir / "final.json").exists() and not conf.force:
            print(f"[{i}/{len(plans)}] {name}: done before ({run_dir / 'final.json'}), kept")
            continue
        print(f"[{i}/{len(plans)}] {name}: {' '.join(overrides)}", flush=True)
        try:
            record = run_method(name, overrides, run_dir)
        except KeyboardInterrupt:
            raise Interrupted(name, out) from None
        manifest["methods"][name] = record
        manifest_path.write_text(json.dumps(manifest, indent=2))
        if record["returncode"] != 0 or not (run_dir / "final.json").exists():
            failed.append(name)
            print(f"[{i}/{len(plans)}] {name} FAILED (exit {record['returncode']}); "
                  f"log: {run_dir / 'compare.log'}", flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=2))

    from cnfgnn.report import write_report

    table, files = write_report([out / n for n in plans if (out / n / "final.json").exists()], out)
    return out, table, files, failed


def _main(args: list[str]) -> int:
    try:
        _, table, files, failed = run(args)
    except Interrupted as stop:
        print(f"\ncnfgnn-compare: interrupted during {stop.method} (its process was stopped); "
              f"finished methods are kept in {stop.out}: run the same command to continue")
        return 130
    print()
    print(table)
    print()
    for f in files:
        print(f"  {f}")
    if failed:
        print(f"cnfgnn-compare: {len(failed)} method(s) failed: {failed} (see their compare.log)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry; returns the exit status (1 when a method failed, 2 bad input)."""
    from cnfgnn.shell import console

    return console("cnfgnn-compare", __doc__, _main, argv)


from cnfgnn._callable import make_callable as _make_callable  # noqa: E402

_make_callable(__name__, "compare")  # cnfgnn.compare(...) is the API's compare

if __name__ == "__main__":
    raise SystemExit(main())
