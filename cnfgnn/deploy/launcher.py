"""Run CNFGNN as a real Flower deployment on loopback: one SuperLink, one SuperNode per client.

Usage::

    cnfgnn-deploy demo                      # make deploy-demo (or python -m cnfgnn.deploy)
    cnfgnn-deploy run [OPTIONS] [HYDRA_OVERRIDES...]
    cnfgnn-deploy run experiment=synthetic_deploy_demo federation.rounds=5
    cnfgnn-deploy run --run-dir outputs/deploy/X --resume ...   # continue a run

Across machines (cnfgnn/deploy/sites.py, docs/deployment.md)::

    cnfgnn-deploy superlink --host ADDR --hosts NAME ... [--database FILE]   # the operator
    cnfgnn-deploy supernode --superlink HOST:PORT --shard DIR --partition I ...  # each site
    cnfgnn-deploy run --superlink HOST:PORT --ca-cert ca.crt --shards DIR [OVERRIDES...]

What ``run`` does (every process gets :func:`cnfgnn.config.flower_environment`):

1. composes ``conf/`` with ``engine=deployment`` and the overrides (``engine.launch.*``
   configures the processes), and writes per-client shards with ``cnfgnn-data shard``
   (``federation.nodes_per_client`` sensors each) unless ``--shards`` names existing ones;
2. starts ``flower-superlink`` (127.0.0.1, a free port; insecure, or with
   ``engine.launch.secure=true`` TLS and SuperNode authentication: certificates and keys from
   :mod:`cnfgnn.deploy.certs` in ``<run>/certs``, the SuperNodes' public keys registered with
   ``flwr supernode register``) and one SuperNode per shard
   (:mod:`cnfgnn.deploy.supernode`), each with ``--node-config "partition-id=<i> num-partitions=<n>
   data-dir=<its shard> state-dir=<run>/node_state"`` and its own Runtime API port;
3. adds a SuperLink connection for that port (with ``root-certificates`` when secure) to
   ``$FLWR_HOME/config.toml`` and runs
   ``flwr run . <connection> --stream`` with the run-config key ``hydra-overrides``;
4. if the server or the SuperLink dies, restarts what died and submits again with
   ``resume=true`` (the run continues after its last checkpointed round), at most
   ``engine.launch.max_restarts`` times;
5. stops exactly the process groups it started (also on Ctrl-C, SIGTERM or an error).

Outputs, in the run directory: the run's own files (config.yaml, metrics.jsonl, final.json,
checkpoint.pt, plots/), ``shards/``, ``node_state/``, ``certs/`` (secure only) and ``logs/``
(superlink.log, supernode_<i>.log, flwr_run.log, deployment.json: start-up seconds, memory per
SuperNode, restarts, lost sensors).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnfgnn.cli import format_table
from cnfgnn.config import compose_cfg, flower_environment
from cnfgnn.data.nodes import nodes_per_client
from cnfgnn.data.shards import load_manifest
from cnfgnn.deploy.certs import generate
from cnfgnn.procs import ROOT, ProcessSet, cpu_seconds_of, memory_of, raise_on_signals
from cnfgnn.shell import check_group_choices

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
DEMO_EXPERIMENT = "synthetic_deploy_demo"
REGISTERED = "SuperNode ID:"  # the SuperNode's log line once the SuperLink accepted it
WORKER_READY = "clientworker ready"
APP_NAME = "cnfgnn-app"  # the Flower app that `flwr run` submits (app_dir)
ACTIVATION_REFUSED = "[code: 2004]"  # the SuperLink refused a SuperNode's key (auth on)


class DeployError(RuntimeError):
    """The deployment could not start or the run did not finish."""


# ---------------------------------------------------------------------- environment
def flower_env() -> dict[str, str]:
    """This process's environment plus what every Flower process needs ."""
    env = dict(os.environ) | flower_environment()
    env["MPLBACKEND"] = env.get("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"
    if (ROOT / "pyproject.toml").is_file():  # a source checkout: its package first
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(BIN), env.get("PATH")]))  # Flower's CLIs
    for key in ("FLWR_HOME", "TMPDIR", "RAY_TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def app_dir(where: Path) -> Path:
    """A Flower app holding only ``pyproject.toml``: the ServerApp and ClientApp are the
    installed ``cnfgnn`` package's on every machine (the same version everywhere)."""
    from importlib.metadata import version

    where.mkdir(parents=True, exist_ok=True)
    (where / "pyproject.toml").write_text(f'''[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_NAME}"
version = "{version("cnfgnn")}"
dependencies = []

[tool.flwr.app]
publisher = "cnfgnn"

[tool.flwr.app.components]
serverapp = "cnfgnn.flower.server_app:app"
clientapp = "cnfgnn.flower.client_app:app"

[tool.flwr.app.config]
hydra-overrides = ""
''')
    return where


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def ensure_connection(flwr_home: Path, address: str, root_certificates: Path | None = None) -> str:
    """Add ``[superlink.<name>]`` for ``address`` to ``$FLWR_HOME/config.toml``.

    Flower 1.42 keeps SuperLink connections there (``flwr run . <name>``). Without
    ``root_certificates`` the entry is insecure and named after the address, so it is written
    once and never changes. With them (a TLS SuperLink) it is named ``<name>-tls``, holds
    ``root-certificates = <path>`` (the CA the SuperLink's certificate is checked against)
    and replaces an older entry of that name. Returns the name.
    """
    name = "cnfgnn-" + address.replace(".", "-").replace(":", "-")
    entry = {"address": address, "insecure": True}
    if root_certificates is not None:
        name += "-tls"
        entry = {"address": address, "root-certificates": str(Path(root_certificates))}
    path = flwr_home / "config.toml"
    flwr_home.mkdir(parents=True, exist_ok=True)
    with open(flwr_home / ".config.toml.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():  # what the flwr CLI would create first
            path.write_text(
                '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
            )
        conf = tomllib.loads(path.read_text())
        old = conf.get("superlink", {}).get(name)
        if old != entry:
            if old is not None:
                _write_config(path, _without_section(path.read_text(), name))
            lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items())
            with open(path, "a") as f:
                f.write(f"\n[superlink.{name}]\n{lines}")
    return name


def _without_section(text: str, name: str) -> str:
    """``text`` (a config.toml) without its ``[superlink.<name>]`` table."""
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        header = line.strip()
        if header.startswith("["):
            skipping = header == f"[superlink.{name}]"
        if not skipping:
            kept.append(line)
    return "".join(kept).rstrip("\n") + "\n"


def _write_config(path: Path, text: str) -> None:
    tomllib.loads(text)  # never leave a broken file behind
    tmp = path.with_name(f".config.toml.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_connection(flwr_home: Path, name: str) -> None:
    """Drop ``[superlink.<name>]`` (written by :func:`ensure_connection`) from the config."""
    path = flwr_home / "config.toml"
    if not path.exists():
        return
    with open(flwr_home / ".config.toml.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_config(path, _without_section(path.read_text(), name))


def compose(overrides: list[str]) -> Any:
    """``conf/`` with ``engine=deployment`` then ``overrides`` (read-only); a misspelt
    ``group=option`` (e.g. ``experiment=``) is refused, as by every command."""
    check_group_choices(overrides)
    return compose_cfg(shlex.join(["engine=deployment", *overrides]))


def supernode_command(launch: Any, flower: list[str], start_after: Path | None = None) -> list[str]:
    """The command line of one SuperNode: Flower's own ``flower-superlink`` with the
    arguments ``flower``, or :mod:`cnfgnn.deploy.supernode` around them when
    ``launch`` (``engine.launch``) asks for the warm worker or shorter waits.
    ``start_after``: connect once that file exists (our entry point only)."""
    ours: list[str] = []
    if str(launch.worker) == "warm":
        ours += [
            "--warm-worker",
            "--worker-idle-poll-s",
            str(launch.worker_idle_poll_s),
            "--worker-busy-poll-s",
            str(launch.worker_busy_poll_s),
            "--worker-hot-s",
            str(launch.worker_hot_s),
            "--worker-pull-timeout-s",
            str(launch.worker_pull_timeout_s),
        ]
    elif str(launch.worker) != "flower":
        raise DeployError(f"engine.launch.worker={launch.worker}: unknown. Fix: warm or flower")
    if launch.fast_waits:
        ours += [
            "--idle-poll-s",
            str(launch.idle_poll_s),
            "--hot-poll-s",
            str(launch.hot_poll_s),
            "--hot-s",
            str(launch.hot_s),
            "--reply-poll-s",
            str(launch.reply_poll_s),
            "--object-backoff-s",
            str(launch.object_backoff_s),
        ]
    if launch.heartbeat_s is not None:
        ours += ["--heartbeat-s", str(launch.heartbeat_s)]
    if not ours:  # Flower's own entry point, untouched
        return [str(BIN / "flower-supernode"), *flower]
    if start_after is not None:  # import and preload now, connect once the keys are registered
        ours += ["--start-after", str(start_after)]
    return [sys.executable, "-m", "cnfgnn.deploy.supernode", *ours, "--", *flower]


# ---------------------------------------------------------------------- shards
def write_shards(
    overrides: list[str], out: Path, nodes_per_client: int | None, procs: ProcessSet
) -> dict:
    """``cnfgnn-data shard <overrides> out=<out> nodes_per_client=K``; returns the manifest."""
    argv = [
        sys.executable,
        "-m",
        "cnfgnn.data.cli",
        "shard",
        "engine=deployment",
        *overrides,
        f"out={out}",
        f"nodes_per_client={'null' if nodes_per_client is None else nodes_per_client}",
    ]
    proc = procs.start("shard", argv)
    if proc.popen.wait() != 0:
        raise DeployError(f"cnfgnn-data shard failed; see {proc.log_path}")
    return load_manifest(out)


# ---------------------------------------------------------------------- deployment
@dataclass
class RunResult:
    """What a deployment run produced."""

    run_dir: Path
    final: dict
    attempts: int
    info: dict = field(default_factory=dict)


class Deployment:
    """A SuperLink and one SuperNode per shard on loopback; a context manager that stops
    exactly what it started.

    Args:
        cfg: composed config (``engine=deployment``); ``cfg.engine.launch`` sets the processes.
        run_dir: the run directory (logs go to ``run_dir/logs``).
        shards_dir: shard set (``cnfgnn-data shard``) with one client per SuperNode.
        progress: one-line progress sink.
    """

    def __init__(
        self, cfg: Any, run_dir: Path, shards_dir: Path, progress: Callable[[str], None] = log.info
    ):
        self.cfg, self.launch = cfg, cfg.engine.launch
        self.run_dir, self.shards_dir = Path(run_dir).resolve(), Path(shards_dir).resolve()
        self.manifest = load_manifest(self.shards_dir)
        self.num_nodes = int(self.manifest["num_clients"])
        self.progress = progress
        self.env = flower_env()
        self.procs = ProcessSet(self.run_dir / "logs", self.env)
        self.host = str(self.launch.host)  # the SuperLink's address (its one port)
        # each SuperNode's own Runtime API (ClientAppIo): never the SuperLink's address
        self.node_host = str(self.launch.get("supernode_host") or "127.0.0.1")
        self.link_port = int(self.launch.superlink_port or free_ports(1, self.host)[0])
        ports = [0, *free_ports(self.num_nodes, self.node_host)]
        first = self.launch.supernode_port
        self.node_ports = [int(first) + i for i in range(self.num_nodes)] if first else ports[1:]
        self.secure = bool(self.launch.get("secure", False))
        self.certs = None  # cnfgnn.deploy.certs.LoopbackCerts when secure
        # secure: created once the SuperNodes' keys are registered; SuperNodes wait for it
        self.gate = self.run_dir / "certs" / "keys_registered"
        if self.secure:
            self.certs = generate(
                self.run_dir / "certs", self.num_nodes, self.host, float(self.launch.cert_days)
            )
            self.gate.unlink(missing_ok=True)
        self.connection = ensure_connection(
            Path(self.env["FLWR_HOME"]),
            f"{self.host}:{self.link_port}",
            self.certs.ca_cert if self.certs else None,
        )
        self.info: dict[str, Any] = {
            "supernodes": self.num_nodes,
            "worker": str(self.launch.worker),
            "fast_waits": bool(self.launch.fast_waits),
            "secure": self.secure,
            "restarts": [],
            "memory_peak_mb": {},
            "load": {},
        }
        self._log_marks: dict[str, int] = {}
        self._cpu: dict[tuple[str, int], float] = {}  # (group name, pid) -> CPU seconds seen
        self._restore_signals: Callable[[], None] | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Deployment:
        try:
            self._restore_signals = raise_on_signals()
        except ValueError:  # not the main thread: Ctrl-C handling stays the caller's
            self._restore_signals = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process group started here; record anything left over."""
        self.procs.stop_all()
        remove_connection(Path(self.env["FLWR_HOME"]), self.connection)
        left = self.procs.leftovers()
        self.info["leftover_pids"] = left
        if left:
            self.progress(f"warning: processes still alive after stop: {left}")
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None
        self._write_info()

    # ------------------------------------------------------------------ processes
    def _mark(self, name: str) -> None:
        log = self.procs.log_dir / f"{name}.log"
        self._log_marks[name] = log.stat().st_size if log.exists() else 0

    def _log_since_mark(self, name: str) -> str:
        log = self.procs.log_dir / f"{name}.log"
        if not log.exists():
            return ""
        with open(log, "rb") as f:
            f.seek(self._log_marks.get(name, 0))
            return f.read().decode(errors="replace")

    def start_superlink(self, register: bool = True) -> None:
        """The SuperLink (``--isolation process``) and the ``flower-superexec`` that starts
        its ServerApps, each in a process group of ours (the SuperLink's own SuperExec would
        be detached into a session of its own, out of reach of a group stop). When secure
        and ``register``: waits for it and registers the SuperNodes' keys."""
        self._mark("superlink")
        self.procs.stop("superexec", grace_s=5.0)  # an old one would serve a dead SuperLink
        link = self.procs.start(
            "superlink",
            [
                BIN / "flower-superlink",
                *self.superlink_security_args(),
                "--disable-runtime-dependency-installation",
                "--isolation",
                "process",
                "--host",
                self.host,
                "--port",
                str(self.link_port),
            ],
        )
        self.procs.start(
            "superexec",
            [
                BIN / "flower-superexec",
                *self.client_tls_args(),
                "--runtime-api-address",
                f"{self.host}:{self.link_port}",
                "--parent-pid",
                str(link.pid),
            ],
            log_name="superlink",
        )
        if self.secure and register:  # it knows no keys yet: register them before any SuperNode
            self.open_gate()

    def open_gate(self) -> None:
        """Wait for the SuperLink, register every SuperNode's key, then create the gate file
        that SuperNodes started with ``--start-after`` wait for (secure only)."""
        self.wait_superlink()
        self.register_supernodes()
        self.gate.touch()

    # ------------------------------------------------------------------ security
    def superlink_security_args(self) -> list[str]:
        """``--insecure``, or TLS with the generated certificate plus SuperNode auth."""
        if self.certs is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.certs.ca_cert),
            "--ssl-certfile",
            str(self.certs.server_cert),
            "--ssl-keyfile",
            str(self.certs.server_key),
            "--enable-supernode-auth",
        ]

    def client_tls_args(self) -> list[str]:
        """How a client of the SuperLink (SuperNode, SuperExec) connects: ``--insecure`` or
        ``--root-certificates <CA>`` (verifies the SuperLink's certificate)."""
        return (
            ["--insecure"]
            if self.certs is None
            else ["--root-certificates", str(self.certs.ca_cert)]
        )

    def wait_superlink(self) -> None:
        """Block until the SuperLink accepts connections (``startup_timeout_s``)."""
        deadline = time.monotonic() + float(self.launch.startup_timeout_s)
        link = self.procs.procs["superlink"]
        while not port_open(self.host, self.link_port):
            if not link.alive():
                raise DeployError(
                    f"superlink exited with {link.popen.returncode}; see {link.log_path}"
                )
            if time.monotonic() > deadline:
                raise DeployError(
                    f"the SuperLink did not listen within "
                    f"{self.launch.startup_timeout_s} s; see {link.log_path}"
                )
            time.sleep(0.1)

    def _start_cli(self, name: str, args: list[Any]) -> None:
        """Start ``flwr <args>`` as the process group ``name`` (log: ``logs/<name>.log``)."""
        self._mark(name)
        self.procs.start(name, [BIN / "flwr", *args])

    def _cli_output(self, name: str, timeout_s: float) -> str:
        """Wait for the command ``name`` (``flwr ...``); its output, or DeployError."""
        proc = self.procs.procs[name]
        try:
            code = proc.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.procs.stop(name, grace_s=2.0)
            raise DeployError(
                f"{name} did not finish in {timeout_s} s; see {proc.log_path}"
            ) from None
        if code != 0:
            tail = self._log_since_mark(name).strip().splitlines()[-1:]
            raise DeployError(f"{name} failed (exit {code}): {' '.join(tail)}; see {proc.log_path}")
        return self._log_since_mark(name)

    def register_supernodes(self) -> list[int]:
        """Register every SuperNode's public key with the SuperLink: Flower's ``flwr
        supernode register <supernode_i.pub> <connection>``, run by :mod:`cnfgnn.deploy.register`
        (one process for all keys); returns the node ids the SuperLink gave them."""
        assert self.certs is not None
        t0 = time.monotonic()
        name = "flwr_register"
        self._mark(name)
        self.procs.start(
            name,
            [
                sys.executable,
                "-m",
                "cnfgnn.deploy.register",
                self.connection,
                *(f"partition-{i}={self.certs.node_public_key(i)}" for i in range(self.num_nodes)),
            ],
        )
        text = self._cli_output(name, float(self.launch.startup_timeout_s))
        ids = [
            int(json.loads(line.split(" ", 1)[1])["node-id"])
            for line in text.splitlines()
            if line.startswith("registered {")
        ]
        if len(ids) != self.num_nodes:
            raise DeployError(
                f"registered {len(ids)} of {self.num_nodes} SuperNode keys; "
                f"see {self.procs.log_dir / (name + '.log')}"
            )
        self.info.setdefault("register_s", []).append(time.monotonic() - t0)
        self.progress(
            f"[deploy] registered {len(ids)} SuperNode key(s) with the SuperLink "
            f"in {time.monotonic() - t0:.1f} s"
        )
        return ids

    def list_supernodes(self) -> list[dict]:
        """``flwr supernode list`` of this SuperLink: one dict per node (``node-id``,
        ``status``, ...), as Flower's JSON output gives them."""
        self._start_cli("flwr_list", ["supernode", "list", self.connection, "--format", "json"])
        text = self._cli_output("flwr_list", float(self.launch.startup_timeout_s))
        return _json_in(text)["nodes"]

    def supernode_argv(self, i: int) -> list[str]:
        shard = self.shards_dir / self.manifest["clients"][i]["dir"]
        node_config = (
            f"partition-id={i} num-partitions={self.num_nodes} "
            f'data-dir="{shard}" state-dir="{self.run_dir / "node_state"}"'
        )
        flower = [
            *self.client_tls_args(),
            "--superlink",
            f"{self.host}:{self.link_port}",
            "--host",
            self.node_host,
            "--port",
            str(self.node_ports[i]),
            "--node-config",
            node_config,
        ]
        if self.certs is not None:
            flower += ["--auth-supernode-private-key", str(self.certs.node_keys[i])]
        gate = self.gate if self.secure else None
        return supernode_command(self.launch, flower, start_after=gate)

    def start_supernode(self, i: int) -> None:
        name = f"supernode_{i}"
        self._mark(name)
        self.procs.start(name, self.supernode_argv(i))

    def wait_ready(
        self, nodes: list[int] | None = None, superlink: bool = False, rejoin: bool = False
    ) -> None:
        """Block until the SuperLink listens and the SuperNodes registered (and their workers
        imported their libraries), or ``engine.launch.startup_timeout_s`` passed.

        ``rejoin``: the SuperNodes are restarts. With SuperNode authentication the SuperLink
        refuses a key whose previous process it still counts online (a crash is noticed
        after two missed heartbeats); such a SuperNode exits and is started again here."""
        nodes = list(range(self.num_nodes)) if nodes is None else nodes
        deadline = time.monotonic() + float(self.launch.startup_timeout_s)
        pending = set(nodes)
        warm = str(self.launch.worker) == "warm"
        while True:
            for name in ["superlink"] + [f"supernode_{i}" for i in sorted(pending)]:
                proc = self.procs.procs.get(name)
                if proc is not None and not proc.alive():
                    if (
                        rejoin
                        and self.secure
                        and name != "superlink"
                        and ACTIVATION_REFUSED in self._log_since_mark(name)
                        and time.monotonic() < deadline
                    ):
                        time.sleep(1.0)  # still online at the SuperLink: try again
                        self.start_supernode(int(name.rsplit("_", 1)[1]))
                        continue
                    raise DeployError(
                        f"{name} exited with {proc.popen.returncode}; see {proc.log_path}"
                    )
            if superlink and port_open(self.host, self.link_port):
                superlink = False
            for i in list(pending):
                text = self._log_since_mark(f"supernode_{i}")
                if REGISTERED in text and (not warm or WORKER_READY in text):
                    pending.discard(i)
            if not pending and not superlink:
                return
            if time.monotonic() > deadline:
                raise DeployError(
                    f"not ready after {self.launch.startup_timeout_s} s: "
                    f"SuperLink {'down' if superlink else 'up'}, SuperNodes "
                    f"{sorted(pending)} not ready; see {self.procs.log_dir}"
                )
            time.sleep(0.1)

    def start(self) -> float:
        """Start the SuperLink and all SuperNodes; returns seconds until all are ready."""
        t0 = time.monotonic()
        self.info["load"]["start"] = os.getloadavg()
        # secure: SuperNodes that can wait (cnfgnn.deploy.supernode) start with the SuperLink and
        # connect once their keys are registered; Flower's own entry point only after that
        gated = self.secure and "--start-after" in self.supernode_argv(0)
        self.start_superlink(register=not gated)
        for i in range(self.num_nodes):
            self.start_supernode(i)
        if gated:
            self.open_gate()
        self.wait_ready(superlink=True)
        startup = time.monotonic() - t0
        self.info["startup_s"] = startup
        self.progress(
            f"[deploy] SuperLink {self.host}:{self.link_port} and {self.num_nodes} "
            f"SuperNodes ready in {startup:.1f} s (worker={self.launch.worker}, "
            f"fast_waits={self.launch.fast_waits}"
            f"{', TLS + SuperNode auth' if self.secure else ''}); "
            f"logs: {self.procs.log_dir}"
        )
        return startup

    # ------------------------------------------------------------------ runs
    def _run_config(self, overrides: list[str], resume: bool, attempt: int) -> Path:
        full = [
            "engine=deployment",
            *overrides,
            f"engine.shards_dir={self.shards_dir}",
            f"run_dir={self.run_dir}",
            f"resume={'true' if resume else 'false'}",
        ]
        text = shlex.join(full)
        compose_cfg(text)  # fail here, not inside the ServerApp, when an override is wrong
        path = self.run_dir / "logs" / f"run_config_{attempt}.toml"
        path.write_text(f"hydra-overrides = {json.dumps(text)}\n")
        return path

    def _sample_memory(self) -> None:
        """Peak PSS/RSS per SuperNode/SuperLink group; CPU seconds per started group."""
        peak = self.info["memory_peak_mb"]
        for name, proc in self.procs.procs.items():
            pids = proc.group_pids()
            key = name.split("_")[0] if name.startswith("flwr_run") else name
            for pid in pids:
                cpu = cpu_seconds_of(pid)
                self._cpu[(key, pid)] = max(self._cpu.get((key, pid), 0.0), cpu)
            if not name.startswith(("supernode_", "superlink")) or not proc.alive():
                continue
            rows = [memory_of(p) for p in pids]
            pss = sum(r.get("pss_mb", 0.0) for r in rows)
            rss = sum(r.get("rss_mb", 0.0) for r in rows)
            old = peak.get(name, {"pss_mb": 0.0, "rss_mb": 0.0, "processes": 0})
            peak[name] = {
                "pss_mb": max(old["pss_mb"], pss),
                "rss_mb": max(old["rss_mb"], rss),
                "processes": max(old["processes"], len(rows)),
            }

    def submit_and_wait(
        self,
        overrides: list[str],
        resume: bool,
        attempt: int,
        on_tick: Callable[[Deployment], None] | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        """One ``flwr run``; True when it wrote ``final.json``."""
        final_path = self.run_dir / "final.json"
        started = time.time()
        run_config = self._run_config(overrides, resume, attempt)
        app = app_dir(self.run_dir / "logs" / "app")
        argv = [BIN / "flwr", "run", app, self.connection, "--stream", "--run-config", run_config]
        name = f"flwr_run_{attempt}"
        proc = self.procs.start(name, argv, log_name="flwr_run")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_sample = 0.0
        while proc.alive():
            if on_tick is not None:
                on_tick(self)
            link = self.procs.procs.get("superlink")
            if link is None or not link.alive():
                time.sleep(2.0)  # let the CLI notice; then stop it
                self.procs.stop(name, grace_s=5.0)
                break
            if deadline is not None and time.monotonic() > deadline:
                self.procs.stop(name, grace_s=5.0)
                raise DeployError(f"the run did not finish within {timeout_s} s")
            if time.monotonic() - last_sample > 2.0:
                self._sample_memory()
                last_sample = time.monotonic()
            time.sleep(0.2)
        self._sample_memory()
        self.procs.stop(name, grace_s=5.0)
        cpu: dict[str, float] = {}
        for (key, _), sec in self._cpu.items():
            cpu[key] = cpu.get(key, 0.0) + sec
        self.info["cpu_s"] = cpu
        return final_path.exists() and final_path.stat().st_mtime >= started

    def heal(self) -> None:
        """Restart what died: the SuperLink (then every SuperNode: a fresh SuperLink does not
        know the old node ids) and any dead SuperNode."""
        link = self.procs.procs.get("superlink")
        restart_all = link is None or not link.alive()
        if restart_all:
            for i in range(self.num_nodes):
                self.procs.stop(f"supernode_{i}", grace_s=5.0)
            self.start_superlink()
        nodes = [
            i
            for i in range(self.num_nodes)
            if restart_all or not self.procs.procs[f"supernode_{i}"].alive()
        ]
        for i in nodes:
            self.start_supernode(i)
        self.wait_ready(nodes, superlink=restart_all, rejoin=not restart_all)
        self.info["restarts"].append({"superlink": restart_all, "supernodes": nodes})

    def run(
        self,
        overrides: list[str],
        resume: bool = False,
        on_tick: Callable[[Deployment], None] | None = None,
        timeout_s: float | None = None,
    ) -> RunResult:
        """Run the experiment; resume from the checkpoint after a server/SuperLink failure."""
        max_restarts = int(self.launch.max_restarts)
        t0 = time.monotonic()
        for attempt in range(max_restarts + 1):
            if self.submit_and_wait(overrides, resume or attempt > 0, attempt, on_tick, timeout_s):
                break
            ckpt = self.run_dir / "checkpoint.pt"
            if attempt == max_restarts:
                raise DeployError(
                    f"the run failed {attempt + 1} time(s); see "
                    f"{self.procs.log_dir / 'flwr_run.log'}"
                )
            self.progress(
                f"[deploy] the run stopped without final.json; resuming from "
                f"{'its checkpoint' if ckpt.exists() else 'the start'} "
                f"(attempt {attempt + 2} of {max_restarts + 1})"
            )
            self.heal()
        else:  # pragma: no cover - the loop breaks or raises
            raise DeployError("unreachable")
        self.info["run_s"] = time.monotonic() - t0
        self.info["load"]["end"] = os.getloadavg()
        snapshot = self.procs.memory()  # per process, after the run (idle federation)
        self.info["memory_after_run_mb"] = {
            k: v for k, v in snapshot.items() if k in ("superlink", "superexec", "supernode_0")
        }
        final = json.loads((self.run_dir / "final.json").read_text())
        self.info.update(summarize(self.run_dir, final))
        self._write_info()
        return RunResult(self.run_dir, final, attempt + 1, dict(self.info))

    def _write_info(self) -> None:
        path = self.run_dir / "logs" / "deployment.json"
        if path.parent.exists():
            path.write_text(json.dumps(self.info, indent=1, default=str))


def _json_in(text: str) -> dict:
    """The JSON object a ``flwr ... --format json`` command printed (its log may hold other
    lines before it)."""
    start = text.find("\n{")
    if start < 0:
        raise DeployError(f"no JSON output from the flwr CLI in: {text[-500:]!r}")
    return json.JSONDecoder().raw_decode(text[start + 1 :])[0]


# ---------------------------------------------------------------------- reporting
def summarize(run_dir: Path, final: dict) -> dict[str, Any]:
    """Round-trip seconds per message type, seconds per round, lost sensors."""
    trips = final.get("round_trips", {})
    secs = final.get("round_trip_seconds", {})
    per_trip = {k: secs[k] / trips[k] for k in trips if trips[k]}
    rounds = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rounds = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    lost: dict[int, dict] = {}
    for f in final.get("failures", []):
        entry = lost.setdefault(
            int(f["client"]),
            {
                "sensors": f.get("sensors", []),
                "first_round": f["round"],
                "first_phase": f["phase"],
                "count": 0,
                "reason": f["reason"],
            },
        )
        entry["count"] += 1
    return {
        "round_trip_s": per_trip,
        "round_trips": trips,
        "seconds_per_round": [r.get("seconds_round") for r in rounds],
        "round_seconds_total": [
            sum(v for k, v in r.get("seconds", {}).items() if not k.endswith("_server"))
            for r in rounds
        ],
        "lost": {str(k): v for k, v in lost.items()},
    }


def report(result: RunResult) -> str:
    """A few lines for the terminal: test metrics, timings, failures."""
    final, info = result.final, result.info
    lines = [format_table(final)]
    rt = info.get("round_trip_s", {})
    rounds = [s for s in info.get("seconds_per_round", []) if s is not None]
    lines.append(
        f"{info['supernodes']} SuperNodes (worker={info['worker']}, fast_waits="
        f"{info['fast_waits']}): start-up {info.get('startup_s', float('nan')):.1f} s, "
        f"run {info.get('run_s', float('nan')):.1f} s, rounds "
        + ", ".join(f"{s:.1f}" for s in rounds)
        + " s"
    )
    if rt:
        lines.append(
            "round trip (s, mean per type): "
            + ", ".join(f"{k.split('.', 1)[-1]} {v:.2f}" for k, v in sorted(rt.items()))
        )
    mem = info.get("memory_peak_mb", {})
    nodes = [v for k, v in mem.items() if k.startswith("supernode_")]
    if nodes:
        lines.append(
            f"memory per SuperNode (peak, all its processes): PSS "
            f"{max(v['pss_mb'] for v in nodes):.0f} MB, RSS "
            f"{max(v['rss_mb'] for v in nodes):.0f} MB"
        )
    for cid, entry in info.get("lost", {}).items():
        lines.append(
            f"client {cid} lost from round {entry['first_round']} "
            f"({entry['first_phase']}): sensors {', '.join(entry['sensors'])}; "
            f"{entry['reason']}"
        )
    if result.attempts > 1:
        lines.append(f"resumed from the checkpoint {result.attempts - 1} time(s)")
    lines.append(f"outputs: {result.run_dir}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- entry points
def default_run_dir(cfg: Any) -> Path:
    base = Path(str(cfg.output_root)) / "deploy" / str(cfg.name)  # under the working directory
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base / f"{stamp}_{cfg.seed}", 1
    while run_dir.exists():
        run_dir, n = base / f"{stamp}_{cfg.seed}_{n}", n + 1
    return run_dir


def deploy_experiment(
    overrides: list[str],
    run_dir: Path | None = None,
    shards: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = log.info,
    on_tick: Callable[[Deployment], None] | None = None,
    timeout_s: float | None = None,
) -> RunResult:
    """Shards, processes, ``flwr run``, clean-up: the whole deployment of one experiment."""
    cfg = compose(overrides)
    if cfg.federation.get("inductive_ratio") is not None:
        raise DeployError(
            "federation.inductive_ratio is set, but cnfgnn-data shard groups "
            "sensors contiguously (clients would mix seen and unseen nodes). "
            "Fix: run inductive experiments in-process or in simulation"
        )
    run_dir = Path(run_dir or default_run_dir(cfg)).resolve()
    if resume and not (run_dir / "checkpoint.pt").exists():
        raise DeployError(f"{run_dir}: no checkpoint.pt to resume from. Fix: check --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    shards_dir = Path(shards).resolve() if shards else run_dir / "shards"
    if not shards:
        if (shards_dir / "manifest.json").exists():
            progress(f"[deploy] reusing shards in {shards_dir}")
        else:
            setup = ProcessSet(run_dir / "logs", flower_env())
            try:
                m = write_shards(
                    overrides, shards_dir, nodes_per_client(cfg.federation.nodes_per_client), setup
                )
            finally:
                setup.stop_all()
            progress(
                f"[deploy] {m['num_clients']} shards of {m['nodes_per_client']} sensor(s) "
                f"({m['num_nodes']} sensors) in {shards_dir}"
            )
    with Deployment(cfg, run_dir, shards_dir, progress) as dep:
        dep.start()
        result = dep.run(overrides, resume=resume, on_tick=on_tick, timeout_s=timeout_s)
    result.info = dict(dep.info)
    return result
