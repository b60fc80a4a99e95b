"""``cnfgnn-compare``: CNFGNN and the paper's baselines on one dataset, one budget, one or
more seeds.

Usage::

    cnfgnn-compare                                       # conf/compare/default.yaml on synthetic
    cnfgnn-compare dataset=los_loop federation.nodes_per_client=207 compare.budget_epochs=5
    cnfgnn-compare dataset=csv dataset.series=my.csv dataset.adjacency=my_adj.csv compare.run=all
    cnfgnn-compare compare.seeds=[42,43,44]              # every method once per seed

Arguments starting with ``compare.`` set keys of ``conf/compare/default.yaml``; every other
argument is a Hydra override given to every run. Each method is its config preset (the
``methods`` map) plus ``federation.rounds = ceil(budget_epochs / R_c)``, so all methods train
the same number of local epochs per node. Each (method, seed) runs as its own ``cnfgnn``
process (its memory is measured alone and a failing run does not stop the others) into
``<out>/<method>/seed<k>/``, its log in ``compare.log`` there. ``compare.jobs`` runs go at once
(default 2, at most one per core), each with ``threads`` = cores / jobs unless ``threads=`` is
given: small per-node kernels gain more from a second run than from a second thread.
``compare.seeds`` (default: the runs' own ``seed``, 42 unless set) lists the seeds. A
(method, seed) whose ``final.json`` is already in ``out`` is not rerun (``compare.force=true``
reruns it), so an interrupted comparison continues where it stopped. At the end
:mod:`cnfgnn.report` writes ``comparison.{csv,md}`` (with several seeds: a mean ± std row per
method as well) and the plots into ``out``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnfgnn.config import CONF_DIR
from cnfgnn.procs import Interrupted as Signalled
from cnfgnn.procs import ProcessSet, cnfgnn_run_command, raise_on_signals
from cnfgnn.shell import UsageError, did_you_mean


def compare_config(args: list[str]) -> tuple[DictConfig, list[str]]:
    """Split ``args`` into the compare settings and the overrides for every run."""
    conf = OmegaConf.load(Path(CONF_DIR) / "compare" / "default.yaml")
    ours = [a[len("compare.") :] for a in args if a.startswith("compare.")]
    runs = [a for a in args if not a.startswith("compare.")]
    conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(ours))
    known = ("run", "budget_epochs", "patience", "out", "force", "methods", "seeds", "jobs")
    unknown = sorted(set(conf.keys()) - set(known))
    if unknown:
        raise UsageError(
            f"unknown setting(s) {['compare.' + u for u in unknown]}."
            f"{did_you_mean('compare.' + unknown[0], ['compare.' + k for k in known])}"
            " See conf/compare/default.yaml"
        )
    names = list(conf.methods) if conf.run in ("all", ["all"]) else list(conf.run)
    bad = [m for m in names if m not in conf.methods]
    if bad:
        raise UsageError(
            f"unknown method(s) {bad}.{did_you_mean(bad[0], list(conf.methods))} "
            f"Known: {list(conf.methods)}"
        )
    conf.run = names
    if int(conf.budget_epochs) < 1:
        raise UsageError("compare.budget_epochs must be at least 1")
    if not isinstance(conf.jobs, int) or isinstance(conf.jobs, bool) or conf.jobs < 1:
        raise UsageError(f"compare.jobs={conf.jobs} must be a whole number of at least 1")
    if conf.seeds is not None:
        seeds = list(conf.seeds) if OmegaConf.is_list(conf.seeds) else [conf.seeds]
        if (
            not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) != len(seeds)
        ):
            raise UsageError(
                f"compare.seeds={conf.seeds} must be distinct whole numbers, "
                "e.g. compare.seeds=[42,43,44]"
            )
        conf.seeds = seeds
    return conf, runs


def seeds_of(conf: DictConfig, runs: list[str]) -> list[int]:
    """``compare.seeds``, or the one seed the runs would use (``seed=...``, else the config's)."""
    if conf.seeds is not None:
        return [int(s) for s in conf.seeds]
    return [int(compose_run(runs).seed)]


def run_dir_of(out: Path, method: str, seed: int) -> Path:
    """Where the run of ``method`` with ``seed`` goes."""
    return out / method / f"seed{seed}"


def compose_run(overrides: list[str]) -> DictConfig:
    """The composed config a ``cnfgnn`` run with ``overrides`` would get (a bad key:
    :class:`UsageError` naming the close keys)."""
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


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def width_and_threads(conf: DictConfig, runs: list[str], pending: int) -> tuple[int, list[str]]:
    """How many runs go at once, and the ``threads=`` override each then gets (none when one
    run goes at a time or the user set ``threads``)."""
    width = max(1, min(int(conf.jobs), pending, cores()))
    if width == 1 or any(a.startswith("threads=") for a in runs):
        return width, []
    return width, [f"threads={max(1, cores() // width)}"]


class RunsInFlight:
    """The runs' process sets, so that Ctrl-C stops every running one and starts no more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: list[tuple[ProcessSet, str]] = []
        self.stopped = False

    def start(self, procs: ProcessSet, name: str, argv: list[str], log_path: Path) -> bool:
        """Start ``argv`` in ``procs`` unless :meth:`stop` came first; False if it did."""
        with self._lock:
            if self.stopped:
                return False
            procs.start(name, argv, cwd=Path.cwd(), log_path=log_path)
            self._started.append((procs, name))
            return True

    def stop(self) -> None:
        """Stop every started run's process group (SIGTERM, then SIGKILL after 5 s)."""
        with self._lock:
            self.stopped = True
            started = list(self._started)
        for procs, name in started:
            procs.stop(name, grace_s=5.0)


def run_method(
    name: str,
    overrides: list[str],
    run_dir: Path,
    flight: RunsInFlight | None = None,
    prefix: str | None = None,
) -> dict[str, Any]:
    """Run one method as a ``cnfgnn`` process, streaming its output (each line prefixed
    ``[prefix]``, default the method); returns its record (``returncode`` None: not started
    because ``flight`` was stopped)."""
    flight = flight or RunsInFlight()
    if flight.stopped:  # Ctrl-C came first: leave an earlier try where it is
        return {"method": name, "overrides": overrides, "returncode": None}
    if run_dir.exists():  # an earlier, unfinished (or forced) try: kept aside, not deleted
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.prev-{datetime.now():%Y%m%d-%H%M%S}"))
    run_dir.mkdir(parents=True)
    procs = ProcessSet(run_dir, dict(os.environ))  # its own process group, stopped as one
    start = time.perf_counter()
    record: dict[str, Any] = {"method": name, "overrides": overrides, "started_at": time.time()}
    if not flight.start(
        procs, name, cnfgnn_run_command(overrides, run_dir), run_dir / "compare.log"
    ):
        return record | {"returncode": None}
    tag = prefix or name
    try:
        code, peak_mb = procs.follow(
            name, lambda line: print(f"[{tag}] {line}", end="", flush=True)
        )
    except BaseException:  # Ctrl-C: stop exactly the processes it started, then re-raise
        procs.stop(name, grace_s=5.0)
        raise
    return record | {
        "returncode": code,
        "seconds_wall": time.perf_counter() - start,
        "ended_at": time.time(),
        "peak_rss_mb": peak_mb,
    }


class Interrupted(Exception):
    """Ctrl-C during runs: their processes were stopped; finished runs are kept."""

    def __init__(self, running: list[str], out: Path):
        super().__init__(running, out)
        self.running, self.out = running, out


class AllFailed(Exception):
    """Every run failed: there is no table."""


def run(args: list[str]) -> tuple[Path, str, list[Path], list[str]]:
    """Run the comparison ``args`` ask for: ``(out dir, table, report files, failed runs)``.

    Raises:
        UsageError: bad settings or overrides (nothing has run).
        Interrupted: Ctrl-C, SIGTERM or SIGHUP (the running methods' processes were stopped).
        AllFailed: no run finished.
    """
    conf, runs = compare_config(args)
    plans = plan(conf, runs)
    seeds = seeds_of(conf, runs)
    out = _out_dir(conf, runs)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "compare.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("runs", {})
    manifest.update(
        {
            "budget_epochs": int(conf.budget_epochs),
            "overrides": runs,
            "seeds": seeds,
            "labels": {k: str(v.label) for k, v in conf.methods.items()},
        }
    )
    jobs = [(name, seed) for name in plans for seed in seeds]
    todo = []
    for i, (name, seed) in enumerate(jobs, 1):
        run_dir = run_dir_of(out, name, seed)
        tag = f"[{i}/{len(jobs)}] {name} seed {seed}"
        if (run_dir / "final.json").exists() and not conf.force:
            print(f"{tag}: done before ({run_dir / 'final.json'}), kept")
            continue
        todo.append((tag, name, seed, run_dir))
    width, threads = width_and_threads(conf, runs, len(todo))
    manifest["jobs"] = width
    print(
        f"cnfgnn-compare: {len(plans)} methods x {len(seeds)} seed(s) {seeds}, "
        f"{conf.budget_epochs} local epochs per node each, {width} run(s) at once"
        f"{f' ({threads[0]} each)' if threads else ''}, output {out}",
        flush=True,
    )
    failed: list[str] = []
    flight = RunsInFlight()

    def one(tag: str, name: str, seed: int, run_dir: Path) -> dict[str, Any]:
        overrides = [*plans[name], *threads, f"seed={seed}"]
        print(f"{tag}: {' '.join(overrides)}", flush=True)
        prefix = name if len(seeds) == 1 else f"{name} {seed}"
        return run_method(name, overrides, run_dir, flight, prefix) | {"seed": seed, "jobs": width}

    main_thread = threading.current_thread() is threading.main_thread()
    restore = raise_on_signals() if main_thread else lambda: None  # SIGTERM/SIGHUP = Ctrl-C
    with ThreadPoolExecutor(max_workers=width) as pool:
        running: dict[Future, tuple[str, str, int, Path]] = {
            pool.submit(one, *job): job for job in todo
        }
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    tag, name, seed, run_dir = running.pop(future)
                    record = future.result()
                    manifest["runs"][run_dir.relative_to(out).as_posix()] = record
                    manifest_path.write_text(json.dumps(manifest, indent=2))
                    if record["returncode"] != 0 or not (run_dir / "final.json").exists():
                        failed.append(f"{name} seed {seed}")
                        print(
                            f"{tag} FAILED (exit {record['returncode']}); "
                            f"log: {run_dir / 'compare.log'}",
                            flush=True,
                        )
        except (KeyboardInterrupt, Signalled):
            stopped = [f"{job[1]} seed {job[2]}" for f, job in running.items() if f.running()]
            flight.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise Interrupted(stopped, out) from None
        finally:
            restore()
    manifest_path.write_text(json.dumps(manifest, indent=2))

    from cnfgnn.report import write_report

    done = [
        run_dir_of(out, n, s) for n, s in jobs if (run_dir_of(out, n, s) / "final.json").exists()
    ]
    if not done:
        raise AllFailed(
            f"every run failed ({', '.join(failed)}); no table. "
            f"Their logs: {out}/<method>/seed<k>/compare.log"
        )
    concurrent = (
        f"Seconds: wall time with up to {width} runs at once on {cores()} cores."
        if width > 1
        else ""
    )
    table, files = write_report(done, out, note=concurrent)
    return out, table, files, failed


def _main(args: list[str]) -> int:
    try:
        _, table, files, failed = run(args)
    except Interrupted as stop:
        print(
            f"\ncnfgnn-compare: interrupted during {', '.join(stop.running) or 'the runs'} "
            f"(stopped); finished runs are kept in {stop.out}: run the same command to "
            "continue"
        )
        return 130
    except AllFailed as exc:
        print(f"cnfgnn-compare: {exc}", file=sys.stderr)
        return 1
    print()
    print(table)
    print()
    for f in files:
        print(f"  {f}")
    if failed:
        print(f"cnfgnn-compare: {len(failed)} run(s) failed: {failed} (see their compare.log)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry; returns the exit status (1 when a run failed, 2 bad input)."""
    from cnfgnn.shell import console

    return console("cnfgnn-compare", __doc__, _main, argv)


from cnfgnn._callable import make_callable as _make_callable  # noqa: E402

_make_callable(__name__, "compare")  # cnfgnn.compare(...) is the API's compare

if __name__ == "__main__":
    raise SystemExit(main())
