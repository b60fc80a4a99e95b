"""A long-lived ClientApp process for one SuperNode started with ``--isolation process``.

With Flower's default (``--isolation subprocess``) the SuperNode's ``flower-superexec``
starts a fresh ``flwr-clientapp`` process for every message: ~3 s to import torch, flwr and
the app, plus the FAB unpacked and hash-checked again, per message (docs/deployment.md §5).
With ``--isolation process`` the SuperNode starts no executor and waits for one to connect
to its Runtime API. This worker is that executor, and it stays:

1. it imports the heavy libraries once;
2. it claims the next ClientApp task (``AcquireTask``), as ``flower-superexec`` would;
3. it runs the task in this process, as ``flwr-clientapp`` would (pull message + context,
   call the ClientApp, push the reply and the updated context), with the ClientApp loaded
   once per FAB (a new FAB hash reloads the app's modules);
4. it polls every ``busy_poll_s`` for ``hot_s`` seconds after a task (messages come in
   bursts), every ``idle_poll_s`` otherwise.

A ClientApp that raises becomes an error reply (``CLIENT_APP_RAISED_EXCEPTION``), exactly as
in ``flwr-clientapp``; the worker goes on. Each task runs in a thread of its own and only the
ClientApp call is serialised: a task whose message never fully arrives (its ServerApp died
while pushing it) waits at most ``pull_timeout_s`` and never blocks the next run's messages,
as separate ``flwr-clientapp`` processes would not. It exits when the SuperNode
(``--parent-pid``) exits.

It drives Flower internals (the Runtime API's task calls, ``flwr-clientapp``'s steps), checked
against Flower ``FLOWER_VERSION`` only. On another version it switches itself off: it warns
and replaces itself with Flower's own ``flower-superexec`` on the same Runtime API, so the
SuperNode still gets its executor (one process per message, as without this worker).

Usage::

    python -m cnfgnn.deploy.clientworker --runtime-api-address 127.0.0.1:9101 --parent-pid PID
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("cnfgnn.clientworker")

FLOWER_VERSION = "1.42.0"  # the Flower whose internals run_task / serve use

APP_LOCK = threading.Lock()  # one ClientApp call at a time (module caches, torch threads)
PRELOAD = (
    "numpy",
    "torch",
    "pandas",
    "omegaconf",
    "hydra",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)


class _AppCache:
    """The ClientApp of the FAB last seen (installed and imported once per FAB hash)."""

    def __init__(self) -> None:
        self.fab_hash: str | None = None
        self.app_dir: Path | None = None
        self.app: Any = None

    def get(self, run: Any, fab: Any) -> Any:
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if fab.hash_str == self.fab_hash and self.app is not None:
            return self.app
        install_from_fab(fab.content, skip_prompt=True)
        app_dir = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
        if self.app_dir is not None:  # another FAB: forget the previous app's modules
            self._unload(self.app_dir)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash, self.app_dir = fab.hash_str, Path(app_dir)
        return self.app

    @staticmethod
    def _unload(app_dir: Path) -> None:
        root = str(app_dir.resolve())
        for name, mod in list(sys.modules.items()):
            path = getattr(mod, "__file__", None) or ""
            if path.startswith(root):
                del sys.modules[name]
        while root in sys.path:
            sys.path.remove(root)


def _task_heartbeat_fn(client: Any):
    """Like Flower's task heartbeat, but never signals this long-lived process."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest as Req

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(Req()).success)
        except Exception:  # noqa: BLE001 - a missed beat is retried by the sender
            return False

    return beat


def run_task(
    address: str,
    token: str,
    apps: _AppCache,
    object_backoff_s: float,
    pull_timeout_s: float = 120.0,
) -> tuple[str, dict[str, float]]:
    """Run one ClientApp task in this process; returns its final sub-status and the seconds
    spent pulling its input (``pull``), in the ClientApp (``app``) and pushing (``push``)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(_task_heartbeat_fn(client))
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed"
    t = {"start": time.perf_counter()}
    try:
        heartbeat.start()
        res = client.PullTaskInput(PullTaskInputRequest())
        identity = (res.task_id, res.run.run_id, res.context.node_id)
        with APP_LOCK:  # as flwr-clientapp: set before messages are inflated
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = identity
        context = context_from_proto(res.context)
        run, fab = run_from_proto(res.run), fab_from_proto(res.fab)
        pulled = client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("no message received from the SuperNode's Runtime API")
        node = Node(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(
                client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
            initial_backoff=object_backoff_s,
            max_time=pull_timeout_s,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id
        t["pulled"] = time.perf_counter()
        with APP_LOCK:  # TaskIdentity is process-global: set it for this task's replies
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = identity
            app = apps.get(run, fab)
            reply = app(message=message, context=context)
        t["app"] = time.perf_counter()
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - becomes an error reply, as in flwr-clientapp
        log.error("ClientApp raised: %s", "".join(traceback.format_exception(ex))[-2000:])
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            with APP_LOCK:
                TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = identity
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # noqa: BLE001
            log.error("failed to push the reply: %s", ex)
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    t["end"] = time.perf_counter()
    pulled, app_done = t.get("pulled", t["end"]), t.get("app", t["end"])
    return sub_status, {
        "pull": pulled - t["start"],
        "app": app_done - pulled,
        "push": t["end"] - app_done,
    }


def _run_logged(
    address: str,
    token: str,
    task_id: int,
    apps: _AppCache,
    object_backoff_s: float,
    pull_timeout_s: float,
) -> None:
    t0 = time.perf_counter()
    try:
        status, parts = run_task(address, token, apps, object_backoff_s, pull_timeout_s)
    except Exception as ex:  # noqa: BLE001 - e.g. the SuperNode went away mid-task
        log.error("task %s: %s", task_id, ex)
        return
    log.info(
        "task %s %s in %.3f s (%s)",
        task_id,
        status,
        time.perf_counter() - t0,
        " ".join(f"{k} {v:.3f}" for k, v in parts.items()),
    )


def serve(
    address: str,
    idle_poll_s: float,
    busy_poll_s: float,
    object_backoff_s: float,
    hot_s: float = 2.0,
    pull_timeout_s: float = 120.0,
) -> None:
    """Claim and run ClientApp tasks of this SuperNode until interrupted: poll every
    ``busy_poll_s`` for ``hot_s`` seconds after a task, every ``idle_poll_s`` otherwise."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    apps, last_task = _AppCache(), -float("inf")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    try:
        while True:
            try:
                res = client.AcquireTask(request)
            except Exception as ex:  # noqa: BLE001 - the SuperNode may still be starting
                log.debug("AcquireTask failed: %s", ex)
                time.sleep(max(idle_poll_s, 0.5))
                continue
            if res.HasField("task") and res.token:
                threading.Thread(
                    target=_run_logged,
                    daemon=True,
                    args=(
                        address,
                        res.token,
                        res.task.task_id,
                        apps,
                        object_backoff_s,
                        pull_timeout_s,
                    ),
                ).start()
                last_task = time.monotonic()
                continue
            # a federation sends messages in bursts (split learning: one per server step)
            hot = time.monotonic() - last_task < hot_s
            time.sleep(busy_poll_s if hot else idle_poll_s)
    finally:
        client.close()


def flower_version() -> str | None:
    """The installed Flower's version string."""
    import flwr

    return getattr(flwr, "__version__", None)


def superexec_command(address: str, parent_pid: int | None) -> list[str]:
    """Flower's own executor for this SuperNode's Runtime API (``--isolation process``)."""
    exe = Path(sys.executable).parent / "flower-superexec"
    cmd = [
        str(exe) if exe.is_file() else (shutil.which("flower-superexec") or str(exe)),
        "--runtime-api-address",
        address,
        "--insecure",
    ]
    return cmd + (["--parent-pid", str(parent_pid)] if parent_pid is not None else [])


def fall_back_to_superexec(address: str, parent_pid: int | None, version: str | None) -> NoReturn:
    """Warn, then replace this process with ``flower-superexec`` (never returns)."""
    msg = (
        f"flwr {version} installed; cnfgnn/deploy/clientworker.py was checked against "
        f"{FLOWER_VERSION} only, so it switches itself off and runs Flower's own "
        "flower-superexec instead (a new ClientApp process per message)"
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    log.info("ready: %s", msg)  # the launcher waits for "clientworker ready"
    logging.shutdown()
    cmd = superexec_command(address, parent_pid)
    os.execv(cmd[0], cmd)
    raise SystemExit(1)  # only reached when os.execv is replaced (tests)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cnfgnn.deploy.clientworker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's --port")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when it exits")
    p.add_argument("--idle-poll-s", type=float, default=0.2)
    p.add_argument("--busy-poll-s", type=float, default=0.01)
    p.add_argument("--hot-s", type=float, default=2.0)
    p.add_argument(
        "--pull-timeout-s",
        type=float,
        default=120.0,
        help="give up on a message whose objects do not arrive",
    )
    p.add_argument("--object-backoff-s", type=float, default=0.02)
    p.add_argument(
        "--preload", default=",".join(PRELOAD), help="modules imported at start (comma-separated)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s clientworker %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    version = flower_version()
    if version != FLOWER_VERSION:
        fall_back_to_superexec(a.runtime_api_address, a.parent_pid, version)
    from flwr.supercore.app_utils import start_parent_process_monitor

    if a.parent_pid is not None:
        # The monitor stops us with a SIGINT when the SuperNode exits. A worker started from a
        # background job inherits SIGINT ignored (a shell's `cmd &`) and would outlive it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        start_parent_process_monitor(a.parent_pid)
    t0 = time.perf_counter()
    for name in filter(None, a.preload.split(",")):
        importlib.import_module(name)
    log.info("ready in %.1f s (preloaded %s)", time.perf_counter() - t0, a.preload)
    try:
        serve(
            a.runtime_api_address,
            a.idle_poll_s,
            a.busy_poll_s,
            a.object_backoff_s,
            a.hot_s,
            a.pull_timeout_s,
        )
    except KeyboardInterrupt:
        log.info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
