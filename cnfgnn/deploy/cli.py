"""``cnfgnn-deploy`` / ``python -m cnfgnn.deploy``: the loopback ``demo`` and ``run``
(:mod:`cnfgnn.deploy.launcher`) and the across-machines ``superlink``, ``supernode`` and
``run --superlink`` (:mod:`cnfgnn.deploy.sites`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnfgnn.deploy import launcher as L
from cnfgnn.deploy import sites
from cnfgnn.procs import Interrupted, raise_on_signals


def main(argv: list[str] | None = None) -> int:
    """Console entry: ``--help``, exit 2 on a bad key (before any process starts)."""
    from cnfgnn.shell import console

    return console("cnfgnn-deploy", L.__doc__, _run, argv)


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="cnfgnn-deploy",
        description=L.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=f"experiment={L.DEMO_EXPERIMENT} (make deploy-demo)")
    run = sub.add_parser("run", help="any experiment: HYDRA_OVERRIDES...")
    sites.add_parsers(sub)
    sites.add_run_options(run)
    for sp in (demo, run):
        sp.add_argument("--run-dir", type=Path, default=None)
        sp.add_argument(
            "--shards",
            type=Path,
            default=None,
            help="existing shard set (with --superlink/--connection: the path on the "
            "SuperLink's machine, where the ServerApp reads it and writes --run-dir)",
        )
        sp.add_argument("--resume", action="store_true", help="continue --run-dir")
        sp.add_argument("--timeout-s", type=float, default=None)
        sp.add_argument("overrides", nargs="*", help="Hydra overrides of conf/")
    a = p.parse_args(argv)
    code = sites.dispatch(a)
    if code is not None:
        return code
    overrides = list(a.overrides)
    if a.command == "demo":
        overrides = [f"experiment={L.DEMO_EXPERIMENT}", *overrides]
    from cnfgnn.shell import compose as check

    check(["engine=deployment", *overrides])  # a misspelt key stops here, nothing started
    restore = raise_on_signals()  # SIGTERM/SIGHUP unwind like Ctrl-C (shard writing too)
    try:
        result = L.deploy_experiment(
            overrides, a.run_dir, a.shards, a.resume, timeout_s=a.timeout_s
        )
    except L.DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        # deploy_experiment already stopped every process group it had started
        why = str(e) or "Ctrl-C"
        print(f"[deploy] interrupted ({why}); stopped the processes it started", file=sys.stderr)
        return 130
    finally:
        restore()
    print(L.report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
