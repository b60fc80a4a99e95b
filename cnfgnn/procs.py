"""The one place child processes start and stop: each in a process group of its own,
stopped by id only (deployments, ``cnfgnn-bench`` cases, privacy sweeps).

Every process is started with ``start_new_session=True``: it leads a new process group (and
session) whose id is its pid, and the children Flower spawns (``flower-superexec``,
``flwr-clientapp``, ``flwr-serverapp``) stay in that group. Stopping sends SIGTERM to that
group, waits, then SIGKILL. Nothing is ever signalled by name.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cnfgnn_run_command(overrides: Sequence[str], run_dir: Path) -> list[str]:
    """The command line of one ``cnfgnn`` run as a child process writing into ``run_dir``
    (no Hydra output subfolder: the run directory is the caller's)."""
    return [
        sys.executable,
        "-m",
        "cnfgnn.cli",
        *overrides,
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
        "hydra.output_subdir=null",
    ]


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(own options, Hydra overrides)`` of a command line ``OPTIONS -- OVERRIDES`` (no
    ``--``: every argument is an option)."""
    args = list(argv)
    if "--" not in args:
        return args, []
    i = args.index("--")
    return args[:i], args[i + 1 :]


@dataclass
class Proc:
    """One started process (and its process group, id = its pid)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    pgid: int
    started: float = field(default_factory=time.monotonic)
    log_start: int = 0  # where its own output begins in the log (after the start line)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def group_pids(self) -> list[int]:
        """Live processes in this group (the leader, Flower's children)."""
        return group_members(self.pgid)


def group_members(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` (from /proc; zombies excluded)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return sorted(out)


def memory_of(pid: int) -> dict[str, float]:
    """``{"rss_mb", "pss_mb"}`` of one process (``/proc/<pid>/smaps_rollup``); {} if gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    vals = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            vals[parts[0][:-1].lower() + "_mb"] = int(parts[1]) / 1024.0
    return vals


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmdline_of(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(p.decode(errors="replace") for p in raw.split(b"\0") if p)


class ProcessSet:
    """Starts processes in their own process groups and stops exactly those.

    Args:
        log_dir: each process writes stdout+stderr to ``log_dir/<name>.log`` (appended).
        env: the environment of every process started.
    """

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env)
        self.procs: dict[str, Proc] = {}
        self.history: list[tuple[str, int]] = []  # every (name, process group) started

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        log_name: str | None = None,
        join: str | None = None,
        log_path: Path | None = None,
    ) -> Proc:
        """Start ``argv`` as a new process group (or in the group of the running process
        ``join``, stopped with it); ``name`` must not be running already. Its output goes
        to ``log_path`` (default ``log_dir/<log_name or name>.log``)."""
        if name in self.procs and self.procs[name].alive():
            raise RuntimeError(
                f"{name} is already running (pid {self.procs[name].pid}); stop it first"
            )
        log_path = Path(log_path) if log_path else self.log_dir / f"{log_name or name}.log"
        with open(log_path, "ab") as log:
            log.write(
                f"\n===== {time.strftime('%H:%M:%S')} start {name}: "
                f"{' '.join(map(str, argv))}\n".encode()
            )
            log.flush()
            log_start = log.tell()
            group = {"start_new_session": True}
            if join is not None:
                group = {"process_group": self.procs[join].pgid}
            popen = subprocess.Popen(
                [str(a) for a in argv],
                cwd=str(cwd),
                env=self.env | (env or {}),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **group,
            )
        proc = Proc(
            name,
            popen,
            log_path,
            popen.pid if join is None else self.procs[join].pgid,
            log_start=log_start,
        )
        self.procs[name] = proc
        self.history.append((name, proc.pgid))
        return proc

    def follow(
        self,
        name: str,
        echo: Callable[[str], None],
        poll_s: float = 0.1,
        timeout_s: float | None = None,
    ) -> tuple[int, float]:
        """Pass each line ``name`` writes to its log to ``echo`` until it exits; returns its
        exit status and its peak resident memory in MB (from the kernel's accounting).

        Raises:
            TimeoutError: it still runs ``timeout_s`` seconds after the call (not stopped).
        """
        proc = self.procs[name]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with open(proc.log_path, "rb") as raw:
            raw.seek(proc.log_start)
            log = io.TextIOWrapper(raw, errors="replace")
            partial = ""  # a line the process is still writing
            while True:
                line = log.readline()
                if line.endswith("\n"):
                    echo(partial + line)
                    partial = ""
                    continue
                partial += line
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    rest = partial + log.read()  # what it wrote just before it exited
                    if rest:
                        for last in rest.splitlines(keepends=True):
                            echo(last)
                    code = os.waitstatus_to_exitcode(status)
                    proc.popen.returncode = code  # reaped here: Popen must not wait again
                    return code, usage.ru_maxrss / 1024.0
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{name} still runs after {timeout_s:g} s")
                time.sleep(poll_s)

    def stop(self, name: str, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """``sig`` to the process group of ``name``; SIGKILL what is left after ``grace_s``."""
        proc = self.procs.get(name)
        if proc is None:
            return
        self._signal_group(proc, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not proc.alive() and not proc.group_pids():
                break
            time.sleep(0.05)
        if proc.alive() or proc.group_pids():
            self._signal_group(proc, signal.SIGKILL)
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # a SIGKILLed member can stay listed for a moment on a loaded machine: wait for it
        deadline = time.monotonic() + 10.0
        while proc.group_pids() and time.monotonic() < deadline:
            time.sleep(0.02)

    def kill(self, name: str) -> None:
        """SIGKILL the process group of ``name`` at once (a crash, for failure tests)."""
        self.stop(name, grace_s=0.0, sig=signal.SIGKILL)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop every process started here, newest first (SIGTERM to all, then SIGKILL)."""
        names = list(self.procs)[::-1]
        for name in names:
            self._signal_group(self.procs[name], signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(
            self.procs[n].alive() or self.procs[n].group_pids() for n in names
        ):
            time.sleep(0.1)
        for name in names:
            self.stop(name, grace_s=0.0, sig=signal.SIGKILL)

    def leftovers(self) -> list[int]:
        """Pids still alive in any group started here (should be [] after stop_all)."""
        return sorted({p for _, pgid in self.history for p in group_members(pgid)})

    def memory(self) -> dict[str, list[dict]]:
        """Per started process group: every member's pid, command, RSS and PSS (MB)."""
        out = {}
        for name, proc in self.procs.items():
            rows = []
            for pid in proc.group_pids():
                rows.append({"pid": pid, "cmd": cmdline_of(pid)[:120]} | memory_of(pid))
            out[name] = rows
        return out

    @staticmethod
    def _signal_group(proc: Proc, sig: int) -> None:
        try:
            os.killpg(proc.pgid, sig)  # a group this set created
        except (ProcessLookupError, PermissionError):
            pass


class Interrupted(BaseException):
    """SIGTERM/SIGHUP arrived: unwinds like KeyboardInterrupt so cleanup runs."""


def raise_on_signals(extra: Callable[[], None] | None = None) -> Callable[[], None]:
    """Make SIGTERM and SIGHUP raise :class:`Interrupted` (SIGINT already raises
    KeyboardInterrupt). Returns a function restoring the previous handlers."""

    def handler(signum, _frame):
        if extra is not None:
            extra()
        raise Interrupted(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore
