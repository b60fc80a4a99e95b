"""A deployment across machines: the operator's SuperLink, one SuperNode per site, and the
submission of a run (docs/deployment.md has the commands per machine).

Usage::

    cnfgnn-deploy superlink --host ADDR [--port 9093] [--database FILE]
        (--certs-dir DIR | --hosts NAME_OR_IP [...] | --insecure)
        [--authorized-keys KEY.pub ...] [--supernode-keys N]
    cnfgnn-deploy supernode --superlink HOST:PORT --shard DIR --partition I --num-partitions N
        (--ca-cert FILE --auth-key FILE | --insecure) [--runtime-port P] [OVERRIDES...]
    cnfgnn-deploy run (--superlink HOST:PORT (--ca-cert FILE | --insecure) | --connection NAME)
        --shards DIR [--run-dir DIR] [OVERRIDES...]

Everything a command writes goes under the current working directory (Flower's home
``.flwr/``, ``.tmp/``, the SuperLink's ``superlink/`` and a site's ``node_state/``), never under
the installed package.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr
supernode register``) and the ServerAppIo API on the SuperLink's one HTTP port
(``--fleet-api-address`` and ``--control-api-address`` are deprecated and ignored), so the
Control API cannot stay on loopback while the Fleet API is public: the port must be reachable
only from the sites and the operator (firewall), and the ServerAppIo API is closed to anyone
without the SuperExec secret (``--superexec-auth-secret-file``, written here).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from cnfgnn.config import compose_cfg, flower_environment
from cnfgnn.deploy import launcher as L
from cnfgnn.deploy.certs import generate, write_node_key
from cnfgnn.procs import Interrupted, ProcessSet, raise_on_signals

READY = "[superlink] ready"  # printed once the SuperLink listens and the keys are registered


def site_env() -> dict[str, str]:
    """This process's environment plus Flower's settings, every path under the working
    directory (the source tree is not added to PYTHONPATH: the installed package runs)."""
    env = dict(os.environ) | flower_environment()
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = os.pathsep.join(filter(None, [str(L.BIN), env.get("PATH")]))
    for key in ("FLWR_HOME", "TMPDIR", "RAY_TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def _local(host: str) -> str:
    """Where a process on the SuperLink's machine reaches it."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _need(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise L.DeployError(f"{path}: {what} not found. Fix: {fix}")
    return path.resolve()


# ---------------------------------------------------------------------- superlink
def _server_tls(a: argparse.Namespace, state: Path) -> tuple[Path, Path, Path, list[Path]]:
    """(ca.crt, server certificate, server key, generated SuperNode private keys)."""
    if a.certs_dir is not None:
        d = Path(a.certs_dir)
        cert = d / "server.pem" if (d / "server.pem").is_file() else d / "server.crt"
        fix = f"put ca.crt, server.pem (or server.crt) and server.key into {d}"
        ca = _need(d / "ca.crt", "CA certificate", fix)
        keys = [d / f"supernode_{i}" for i in range(a.supernode_keys)]
        for i, k in enumerate(keys):
            if not k.exists():
                write_node_key(k, f"cnfgnn-supernode-{i}")
        return (
            ca,
            _need(cert, "server certificate", fix),
            _need(d / "server.key", "server key", fix),
            keys,
        )
    if not a.hosts:
        raise L.DeployError(
            "no certificates: give --certs-dir DIR (ca.crt, server.pem, "
            "server.key), or --hosts with the names/IPs the sites use to "
            "reach this machine (certificates are generated), or --insecure"
        )
    out = state / "certs"
    if (out / "ca.crt").is_file() and not a.new_certs:
        print(f"[superlink] reusing the certificates in {out} (--new-certs replaces them)")
        keys = sorted(p for p in out.glob("supernode_*") if not p.name.endswith(".pub"))
    else:
        c = generate(out, a.supernode_keys, a.hosts[0], a.cert_days, tuple(a.hosts[1:]))
        keys = list(c.node_keys)
    return out / "ca.crt", out / "server.crt", out / "server.key", keys


def _secret(state: Path) -> Path:
    """The SuperExec shared secret (32 random bytes, mode 0600), created once."""
    path = state / "superexec.secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32).hex().encode())
    return path


def _register(connection: str, keys: list[Path], procs: ProcessSet, timeout_s: float) -> None:
    """``flwr supernode register`` for each public key; a key the SuperLink already knows
    (kept in ``--database``) is reported, not fatal."""
    for key in keys:
        name = f"register_{key.name.removesuffix('.pub')}"
        proc = procs.start(
            name,
            [sys.executable, "-m", "cnfgnn.deploy.register", connection, f"{key.stem}={key}"],
            cwd=Path.cwd(),
            log_name="register",
        )
        code = proc.popen.wait(timeout=timeout_s)
        tail = proc.log_path.read_text().strip().splitlines()[-1:]
        if code == 0:
            print(f"[superlink] registered {key}", flush=True)
        elif "already in use" in " ".join(tail):  # kept in --database from an earlier start
            print(f"[superlink] already registered: {key}", flush=True)
        else:
            print(f"[superlink] NOT registered {key}: {' '.join(tail)}", flush=True)


def superlink(a: argparse.Namespace) -> int:
    """Run the SuperLink (and the SuperExec for its ServerApps) until Ctrl-C/SIGTERM."""
    env = site_env()
    state = Path(a.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    database = Path(a.database or state / "state.db").resolve()
    procs = ProcessSet(state / "logs", env)
    local = f"{_local(a.host)}:{a.port}"
    secret = _secret(state)
    link_tls: list[Any] = ["--insecure"]
    exec_tls: list[Any] = ["--insecure"]
    ca: Path | None = None
    keys: list[Path] = []
    if not a.insecure:
        ca, cert, key, keys = _server_tls(a, state)
        link_tls = [
            "--ssl-ca-certfile",
            ca,
            "--ssl-certfile",
            cert,
            "--ssl-keyfile",
            key,
            "--enable-supernode-auth",
        ]
        exec_tls = ["--root-certificates", ca]
    pubs = [Path(k) for k in a.authorized_keys] + [k.with_name(k.name + ".pub") for k in keys]
    for p in pubs:
        _need(p, "SuperNode public key", "give the .pub file of each site's key pair")
    restore = raise_on_signals()
    try:
        link = procs.start(
            "superlink",
            [
                str(x)
                for x in [
                    L.BIN / "flower-superlink",
                    *link_tls,
                    "--database",
                    database,
                    "--disable-runtime-dependency-installation",
                    "--isolation",
                    "process",
                    "--superexec-auth-secret-file",
                    secret,
                    "--host",
                    a.host,
                    "--port",
                    a.port,
                ]
            ],
            cwd=Path.cwd(),
        )
        procs.start(
            "superexec",
            [
                str(x)
                for x in [
                    L.BIN / "flower-superexec",
                    *exec_tls,
                    "--runtime-api-address",
                    local,
                    "--parent-pid",
                    link.pid,
                    "--superexec-auth-secret-file",
                    secret,
                ]
            ],
            cwd=Path.cwd(),
            log_name="superlink",
        )
        host, port = local.rsplit(":", 1)
        deadline = time.monotonic() + a.startup_timeout_s
        while not L.port_open(host, int(port)):
            if not link.alive() or time.monotonic() > deadline:
                raise L.DeployError(f"the SuperLink did not start; see {link.log_path}")
            time.sleep(0.1)
        connection = L.ensure_connection(Path(env["FLWR_HOME"]), local, ca)
        if pubs:
            if a.insecure:
                raise L.DeployError(
                    "--authorized-keys needs TLS (SuperNode authentication is off with --insecure)"
                )
            _register(connection, pubs, procs, a.startup_timeout_s)
        scheme = "http" if a.insecure else "https"
        print(
            f"{READY}: {scheme}://{a.host}:{a.port} (Fleet, Control and ServerAppIo APIs; "
            f"{'INSECURE' if a.insecure else 'TLS, SuperNode authentication'}), database "
            f"{database}, connection '{connection}' in {env['FLWR_HOME']}/config.toml"
            + (f", CA certificate for the sites: {ca}" if ca else ""),
            flush=True,
        )
        for k in keys:
            print(
                f"[superlink] give site {k.name.rsplit('_', 1)[-1]} its private key {k}", flush=True
            )
        while link.alive():
            time.sleep(0.5)
        print(
            f"error: the SuperLink exited ({link.popen.returncode}); see {link.log_path}",
            file=sys.stderr,
        )
        return 1
    except L.DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("[superlink] stopping", flush=True)
        return 0
    finally:
        procs.stop_all()
        restore()


# ---------------------------------------------------------------------- supernode
def supernode_argv(a: argparse.Namespace) -> list[str]:
    """The command of one site's SuperNode (Runtime API and worker on 127.0.0.1)."""
    shard = Path(a.shard).resolve()
    _need(
        shard / "series.npz",
        "client shard",
        "give --shard the client_XXXX directory that cnfgnn-data shard wrote for this site",
    )
    if not 0 <= a.partition < a.num_partitions:
        raise L.DeployError(f"--partition {a.partition} is not in 0..{a.num_partitions - 1}")
    cfg = compose_cfg(shlex.join(["engine=deployment", *a.overrides]))
    state = Path(a.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    port = a.runtime_port or L.free_ports(1, "127.0.0.1")[0]
    node_config = (
        f"partition-id={a.partition} num-partitions={a.num_partitions} "
        f'data-dir="{shard}" state-dir="{state}"'
    )
    if a.insecure:
        tls = ["--insecure"]
    else:
        if a.ca_cert is None or a.auth_key is None:
            raise L.DeployError(
                "give --ca-cert (the SuperLink's CA certificate) and "
                "--auth-key (this site's private key), or --insecure"
            )
        tls = [
            "--root-certificates",
            str(_need(Path(a.ca_cert), "CA certificate", "copy ca.crt from the operator")),
            "--auth-supernode-private-key",
            str(_need(Path(a.auth_key), "private key", "copy this site's key")),
        ]
    flower = [
        *tls,
        "--superlink",
        a.superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]
    return L.supernode_command(cfg.engine.launch, flower)


def supernode(a: argparse.Namespace) -> int:
    """Become this site's SuperNode (``exec``: same pid and process group)."""
    try:
        argv = supernode_argv(a)
    except L.DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[supernode] partition {a.partition}: {shlex.join(argv)}", flush=True)
    os.execve(argv[0], argv, site_env())
    return 1  # pragma: no cover - exec does not return


# ---------------------------------------------------------------------- run


def submit(a: argparse.Namespace) -> int:
    """Submit one experiment to a running SuperLink and stream its log."""
    env = site_env()
    if a.connection is None and a.superlink is None:
        raise L.DeployError(
            "give --superlink HOST:PORT (with --ca-cert or --insecure) or "
            "--connection NAME (a [superlink.NAME] in $FLWR_HOME/config.toml)"
        )
    if a.connection is not None:
        connection = a.connection
    elif a.insecure:
        connection = L.ensure_connection(Path(env["FLWR_HOME"]), a.superlink)
    else:
        if a.ca_cert is None:
            raise L.DeployError("--superlink needs --ca-cert FILE (or --insecure)")
        connection = L.ensure_connection(
            Path(env["FLWR_HOME"]),
            a.superlink,
            _need(Path(a.ca_cert), "CA certificate", "the operator's ca.crt"),
        )
    if a.shards is None:
        raise L.DeployError(
            "give --shards DIR: the shard set (its server/graph.npz and "
            "manifest.json are what the server reads)"
        )
    shards = Path(a.shards).resolve()
    cfg = L.compose(a.overrides)
    run_dir = Path(a.run_dir or L.default_run_dir(cfg)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    full = [
        "engine=deployment",
        *a.overrides,
        f"engine.shards_dir={shards}",
        f"run_dir={run_dir}",
        f"resume={'true' if a.resume else 'false'}",
    ]
    text = shlex.join(full)
    compose_cfg(text)  # a wrong override fails here, not in the ServerApp
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    (logs / "run_config.toml").write_text(f"hydra-overrides = {json.dumps(text)}\n")
    app = L.app_dir(logs / "app")
    procs = ProcessSet(logs, env)
    started = time.time()
    t0 = time.monotonic()
    restore = raise_on_signals()
    try:
        proc = procs.start(  # its log: the run's log as the SuperLink streams it
            "flwr_run",
            [
                str(x)
                for x in [
                    L.BIN / "flwr",
                    "run",
                    app,
                    connection,
                    "--stream",
                    "--run-config",
                    logs / "run_config.toml",
                ]
            ],
            cwd=Path.cwd(),
        )

        def echo(line: str) -> None:
            sys.stdout.write(line)
            sys.stdout.flush()

        try:
            procs.follow("flwr_run", echo, poll_s=0.2, timeout_s=a.timeout_s or None)
        except TimeoutError:
            raise L.DeployError(f"the run did not finish within {a.timeout_s} s") from None
    except L.DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print(
            "[run] interrupted; the run goes on at the SuperLink (flwr stop RUN_ID "
            f"{connection} stops it)",
            file=sys.stderr,
        )
        return 130
    finally:
        procs.stop_all(grace_s=5.0)
        restore()
    final_path = run_dir / "final.json"
    if not (final_path.exists() and final_path.stat().st_mtime >= started):
        print(
            f"error: the run wrote no {final_path}; see {proc.log_path}. The ServerApp writes "
            "the run directory on the SuperLink's machine: submit from there, or give "
            "--run-dir/--shards as paths on that machine",
            file=sys.stderr,
        )
        return 1
    final = json.loads(final_path.read_text())
    info = L.summarize(run_dir, final) | {"run_s": time.monotonic() - t0, "load": os.getloadavg()}
    (logs / "run.json").write_text(json.dumps(info, indent=1))
    print(L.format_table(final))
    print(
        f"run {info['run_s']:.1f} s, rounds "
        + ", ".join(f"{s:.1f}" for s in info["seconds_per_round"] if s is not None)
        + f" s; outputs: {run_dir}"
    )
    return 0


# ---------------------------------------------------------------------- arguments
def add_parsers(sub: Any) -> None:
    """The ``superlink`` and ``supernode`` subcommands, and ``run``'s remote options."""
    p = sub.add_parser("superlink", help="the operator's SuperLink (foreground; Ctrl-C stops)")
    p.add_argument(
        "--host", required=True, help="address the SuperNodes reach (0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=int, default=9093)
    p.add_argument(
        "--database", default=None, help="SuperLink state file (default: superlink/state.db)"
    )
    p.add_argument(
        "--state-dir",
        default="superlink",
        help="logs, generated certificates, SuperExec secret (default: ./superlink)",
    )
    p.add_argument(
        "--certs-dir",
        default=None,
        help="your certificates: ca.crt, server.pem (or server.crt), server.key",
    )
    p.add_argument(
        "--hosts",
        nargs="+",
        default=None,
        help="generate certificates for these names/IPs (the first is the subject)",
    )
    p.add_argument("--new-certs", action="store_true", help="replace generated certificates")
    p.add_argument("--cert-days", type=float, default=365.0)
    p.add_argument(
        "--supernode-keys",
        type=int,
        default=0,
        help="generate N SuperNode key pairs (supernode_<i>, .pub) and register them",
    )
    p.add_argument(
        "--authorized-keys",
        nargs="*",
        default=[],
        help="SuperNode public keys (.pub, OpenSSH) to register",
    )
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication")
    p.add_argument("--startup-timeout-s", type=float, default=120.0)

    n = sub.add_parser("supernode", help="one site's SuperNode (foreground)")
    n.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    n.add_argument("--shard", required=True, help="this site's client_XXXX shard directory")
    n.add_argument("--partition", type=int, required=True)
    n.add_argument("--num-partitions", type=int, required=True)
    n.add_argument("--ca-cert", default=None, help="the SuperLink's CA certificate (ca.crt)")
    n.add_argument("--auth-key", default=None, help="this site's private key (supernode_<i>)")
    n.add_argument("--insecure", action="store_true")
    n.add_argument(
        "--runtime-port",
        type=int,
        default=None,
        help="local Runtime API port on 127.0.0.1 (default: a free one)",
    )
    n.add_argument("--state-dir", default="node_state", help="client state (default: ./node_state)")
    n.add_argument("overrides", nargs="*", help="Hydra overrides (engine.launch.*)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``run`` against a running SuperLink instead of a loopback one of its own."""
    p.add_argument("--superlink", default=None, help="HOST:PORT of a running SuperLink")
    p.add_argument(
        "--connection", default=None, help="a [superlink.NAME] of $FLWR_HOME/config.toml"
    )
    p.add_argument("--ca-cert", default=None, help="the SuperLink's CA certificate")
    p.add_argument("--insecure", action="store_true")


def dispatch(a: argparse.Namespace) -> int | None:
    """Run a site command; None when ``a`` is the loopback ``demo``/``run``."""
    if a.command == "superlink":
        return superlink(a)
    if a.command == "supernode":
        return supernode(a)
    if a.command == "run" and (a.superlink or a.connection):
        try:
            return submit(a)
        except L.DeployError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return None
