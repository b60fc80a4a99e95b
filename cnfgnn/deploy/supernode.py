"""A Flower SuperNode, optionally with a long-lived ClientApp worker and shorter waits.

Usage::

    python -m cnfgnn.deploy.supernode [--warm-worker] [--idle-poll-s S] [--hot-poll-s S] [--hot-s S]
        [--reply-poll-s S] [--object-backoff-s S] [--heartbeat-s S] -- <flower-supernode args>

* ``--warm-worker``: adds ``--isolation process`` and starts :mod:`cnfgnn.deploy.clientworker` as a
  child (same process group, exits with this process), so ClientApps run in one process
  that stays up instead of one new process per message.
* the wait options: :mod:`cnfgnn.deploy.fastwaits` (Flower's fixed 3 s / 0.5 s / 1 s waits, and the
  heartbeat interval the SuperLink uses to declare this node dead).
* ``--start-after PATH``: import Flower (and start the worker) at once, but connect to the
  SuperLink only once ``PATH`` exists (the launcher creates it after registering the
  SuperNodes' keys, ``engine.launch.secure=true``).

Then it runs Flower's own ``flower-supernode`` entry point in this process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from cnfgnn.deploy.fastwaits import Waits, patch_supernode


def _runtime_address(flower_args: list[str]) -> str:
    host, port = "127.0.0.1", "9094"  # flower-supernode's defaults
    for i, arg in enumerate(flower_args):
        for flag in ("--host", "--port"):
            if arg == flag and i + 1 < len(flower_args):
                value = flower_args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            if flag == "--host":
                host = value
            else:
                port = value
    return f"{host}:{port}"


def _wait_for_file(path: str, timeout_s: float) -> None:
    """Block until ``path`` exists; exit with an error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(
                f"cnfgnn.deploy.supernode: {path} did not appear within {timeout_s} s "
                "(the launcher registers the SuperNode keys, then creates it)"
            )
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = (
        (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
    )
    p = argparse.ArgumentParser(prog="python -m cnfgnn.deploy.supernode")
    p.add_argument("--warm-worker", action="store_true")
    p.add_argument("--worker-idle-poll-s", type=float, default=0.2)
    p.add_argument("--worker-busy-poll-s", type=float, default=0.01)
    p.add_argument("--worker-hot-s", type=float, default=2.0)
    p.add_argument("--worker-pull-timeout-s", type=float, default=120.0)
    for name in ("idle-poll-s", "hot-poll-s", "reply-poll-s", "object-backoff-s", "heartbeat-s"):
        p.add_argument(f"--{name}", type=float, default=None)
    p.add_argument("--hot-s", type=float, default=3.0)
    p.add_argument("--start-after", default=None, help="connect once this file exists")
    p.add_argument("--start-after-timeout-s", type=float, default=600.0)
    a = p.parse_args(ours)
    if a.heartbeat_s is not None and a.heartbeat_s < 10:
        p.error("--heartbeat-s must be >= 10 (Flower subtracts a 5 s call timeout from it)")
    changed = patch_supernode(
        Waits(
            a.idle_poll_s, a.reply_poll_s, a.object_backoff_s, a.heartbeat_s, a.hot_poll_s, a.hot_s
        )
    )
    if changed:
        print(f"cnfgnn.deploy.supernode: Flower waits set to {changed}", flush=True)
    if a.warm_worker:
        if "--isolation" in flower_args:
            p.error("--warm-worker sets --isolation process itself")
        flower_args += ["--isolation", "process"]
        backoff = a.object_backoff_s if a.object_backoff_s is not None else 1.0
        # a child in this process group: stopped with it, and it watches this pid
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cnfgnn.deploy.clientworker",
                "--runtime-api-address",
                _runtime_address(flower_args),
                "--parent-pid",
                str(os.getpid()),
                "--idle-poll-s",
                str(a.worker_idle_poll_s),
                "--busy-poll-s",
                str(a.worker_busy_poll_s),
                "--hot-s",
                str(a.worker_hot_s),
                "--pull-timeout-s",
                str(a.worker_pull_timeout_s),
                "--object-backoff-s",
                str(backoff),
            ]
        )
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True, colored=False)  # log files: when, not colour
    if a.start_after is not None:
        _wait_for_file(a.start_after, a.start_after_timeout_s)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
