"""The deployment across machines, on one host: the operator's SuperLink listens on 127.0.0.2
(``cnfgnn-deploy superlink``, TLS, SuperNode authentication, state in a database file), and
each site's SuperNode is started through ``cnfgnn-deploy supernode`` from its own empty working
directory holding only its shard, by the package installed from the wheel into a separate
venv; ``cnfgnn-deploy run --superlink`` submits the run. Its test metrics equal those of the
in-process run. Marked ``deployment`` (``make test-deployment``).

The site venv: the wheel built as ``.ci/wheel-smoke`` builds it, installed with ``--no-deps``
into ``.tmp/site-venv-<wheel hash>`` (reused while the wheel's contents are unchanged); its
dependencies (torch, flwr, PyG, ...) come from the interpreter running the tests through a
``.pth`` path entry, which adds no source tree (that interpreter's own ``.pth`` hooks, e.g. an
editable install, are not run). Installing the dependencies afresh takes ~10 min on 2 shared cores:
``CNFGNN_SITE_VENV=full`` does that (cached as ``.tmp/site-venv-full-<wheel hash>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from cnfgnn.deploy import launcher as deploy
from cnfgnn.deploy.sites import READY
from cnfgnn.procs import ProcessSet
from tests.deployment.test_deployment import _assert_same_test_metrics, _inprocess
from tests.helpers import TINY

pytestmark = pytest.mark.deployment

ROOT = Path(__file__).resolve().parents[2]
LINK_HOST = "127.0.0.2"
SITES = 2
OVERRIDES = (
    *TINY,
    "dataset.days=2",
    "federation.nodes_per_client=3",
    "federation.server_batch_size=196",
    "federation.rounds=1",
)
STARTUP_TIMEOUT_S = 240.0
RUN_TIMEOUT_S = 600.0


def _wheel_venv() -> Path:
    """A venv holding the wheel of this checkout (cached by the SHA-256 of the wheel's
    member names and CRCs: rebuilding the same sources gives the same key).

    ``CNFGNN_SITE_VENV=full``: the wheel with all its dependencies installed by pip (as a
    user would; ~10 min the first time); otherwise the dependencies are borrowed (module
    docstring)."""
    full = os.environ.get("CNFGNN_SITE_VENV") == "full"
    dist = ROOT / ".tmp" / "site-wheel"
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            dist,
            ROOT,
        ],
        check=True,
        cwd=ROOT,
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = dist.glob("cnfgnn-*.whl")
    with zipfile.ZipFile(wheel) as z:  # the contents, not the zip's time stamps
        members = sorted(f"{i.filename}:{i.CRC:08x}" for i in z.infolist())
    digest = hashlib.sha256("\n".join(members).encode()).hexdigest()[:16]
    venv = ROOT / ".tmp" / f"site-venv-{'full-' if full else ''}{digest}"
    if not (venv / "ok").exists():
        kind = f"site-venv-{'full-' if full else ''}" + "[0-9a-f]" * 16
        for old in venv.parent.glob(kind):  # older wheels' venvs, and this one half made
            shutil.rmtree(old, ignore_errors=True)
        env = _site_env(venv)  # no PYTHONPATH: the checkout is no install
        if full:
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, env=env)
            pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
            subprocess.run([*pip, "torch==2.13.0"], check=True, env=env)  # CPU build first
            subprocess.run([*pip, wheel], check=True, env=env)
        else:
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "--python",
                    venv / "bin" / "python",
                    "install",
                    "-q",
                    "--no-deps",
                    wheel,
                ],
                check=True,
                env=env,
            )
            # after the install: pip must not see (or touch) the other environment's packages
            site = Path(
                sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"]
            )
            (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        (venv / "ok").touch()
    return venv


def _site_env(cwd: Path) -> dict[str, str]:
    """A site's environment: no source tree, every Flower path under its own directory."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "PYTHONPATH",
            "CNFGNN_CONF",
            "FLWR_HOME",
            "TMPDIR",
            "RAY_TMPDIR",
            "CNFGNN_STATE_ROOT",
            "VIRTUAL_ENV",
        )
    }
    env["MPLBACKEND"] = "Agg"
    return env


def _wait_for(procs: ProcessSet, name: str, needles: tuple[str, ...], timeout_s: float) -> str:
    proc = procs.procs[name]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = proc.log_path.read_text(errors="replace")
        if all(n in text for n in needles):
            return text
        assert proc.alive(), f"{name} exited ({proc.popen.poll()}): {text[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{name}: {needles} not seen in {timeout_s} s; see {proc.log_path}")


def test_separated_sites_through_the_wheel_equal_an_inprocess_run(tmp_path):
    venv = _wheel_venv()
    site_python = venv / "bin" / "python"
    op = tmp_path / "operator"
    op.mkdir()
    op_env = dict(deploy.flower_env())
    procs = ProcessSet(tmp_path / "logs", op_env)
    site_procs = ProcessSet(tmp_path / "logs", {})  # the operator's environment stays out
    try:
        deploy.write_shards(list(OVERRIDES), op / "shards", 3, procs)
        port = deploy.free_ports(1, LINK_HOST)[0]
        t0 = time.monotonic()
        procs.start(
            "superlink",
            [
                sys.executable,
                "-m",
                "cnfgnn.deploy",
                "superlink",
                "--host",
                LINK_HOST,
                "--port",
                port,
                "--hosts",
                LINK_HOST,
                "--supernode-keys",
                SITES,
                "--database",
                op / "link.db",
            ],
            cwd=op,
        )
        text = _wait_for(procs, "superlink", (READY,), STARTUP_TIMEOUT_S)
        assert f"https://{LINK_HOST}:{port}" in text
        certs = op / "superlink" / "certs"
        manifest = deploy.load_manifest(op / "shards")
        sites = []
        for i in range(SITES):
            site, secrets = tmp_path / f"site_{i}", tmp_path / f"secrets_{i}"
            site.mkdir()
            secrets.mkdir()
            shutil.copytree(op / "shards" / manifest["clients"][i]["dir"], site / "shard")
            shutil.copy(certs / "ca.crt", secrets / "ca.crt")
            shutil.copy(certs / f"supernode_{i}", secrets / "key")
            assert sorted(p.name for p in site.iterdir()) == ["shard"]
            found = subprocess.run(
                [site_python, "-c", "import cnfgnn; print(cnfgnn.__file__)"],
                cwd=site,
                env=_site_env(site),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert Path(found.strip()).is_relative_to(venv), found  # the wheel's copy
            site_procs.start(
                f"site_{i}",
                [
                    venv / "bin" / "cnfgnn-deploy",
                    "supernode",
                    "--superlink",
                    f"{LINK_HOST}:{port}",
                    "--shard",
                    "shard",
                    "--partition",
                    i,
                    "--num-partitions",
                    SITES,
                    "--ca-cert",
                    secrets / "ca.crt",
                    "--auth-key",
                    secrets / "key",
                ],
                cwd=site,
                env=_site_env(site),
            )
            sites.append(site)
        for i in range(SITES):
            text = _wait_for(
                site_procs, f"site_{i}", ("SuperNode ID:", "clientworker ready"), STARTUP_TIMEOUT_S
            )
            # the site's own Runtime API and worker: loopback 127.0.0.1, never the link's
            assert "--host 127.0.0.1" in text and str(ROOT / "cnfgnn") not in text
            env = (
                (Path("/proc") / str(site_procs.procs[f"site_{i}"].pid) / "environ")
                .read_bytes()
                .split(b"\0")
            )
            assert not any(e.startswith(b"PYTHONPATH=") for e in env)
        startup = time.monotonic() - t0
        t1 = time.monotonic()
        run = procs.start(
            "run",
            [
                sys.executable,
                "-m",
                "cnfgnn.deploy",
                "run",
                "--superlink",
                f"{LINK_HOST}:{port}",
                "--ca-cert",
                certs / "ca.crt",
                "--shards",
                op / "shards",
                "--run-dir",
                op / "run",
                "--timeout-s",
                RUN_TIMEOUT_S,
                *OVERRIDES,
            ],
            cwd=op,
        )
        assert run.popen.wait(timeout=RUN_TIMEOUT_S + 30) == 0, run.log_path.read_text()[-4000:]
        run_s = time.monotonic() - t1
        final = json.loads((op / "run" / "final.json").read_text())
        assert final["engine"] == "deployment" and final["failures"] == []
        assert final["nodes"]["clients"] == SITES
        for site in sites:  # each site wrote only under its own directory
            assert (site / "node_state").is_dir() and (site / ".flwr").is_dir()
        info = json.loads((op / "run" / "logs" / "run.json").read_text())
        print(
            f"[separated] start-up {startup:.1f} s, run {run_s:.1f} s, rounds "
            f"{info['seconds_per_round']} s, load {os.getloadavg()}"
        )
        _assert_same_test_metrics(final, _inprocess(list(OVERRIDES), tmp_path))
    finally:
        site_procs.stop_all(grace_s=10.0)
        procs.stop_all(grace_s=10.0)
