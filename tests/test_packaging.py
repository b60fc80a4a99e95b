"""What the wheel carries, and where the package looks for its configs and data."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from cnfgnn import paths
from cnfgnn.config import flower_environment, state_root
from tests.helpers import ROOT, make_cfg

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed_and_conf_data_are_mapped():
    setuptools = PYPROJECT["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cnfgnn").rglob("__init__.py")
    }
    listed = set(setuptools["packages"])
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"
    assert setuptools["package-dir"] == {"cnfgnn.conf": "conf", "cnfgnn.bundled": "data"}
    assert listed - on_disk == {"cnfgnn.conf", "cnfgnn.bundled"}


def test_checkout_layout_is_found(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.ENV_CONF, raising=False)
    monkeypatch.chdir(tmp_path)  # independent of the working directory
    assert paths.conf_dir().resolve() == (ROOT / "conf").resolve()
    assert paths.data_dir().resolve() == (ROOT / "data").resolve()
    monkeypatch.setenv(paths.ENV_CONF, str(tmp_path))
    assert paths.conf_dir() == tmp_path


def test_installed_layout_is_preferred(monkeypatch, tmp_path):
    """In a wheel, conf/ and data/ sit inside the package as conf/ and bundled/."""
    pkg = tmp_path / "site" / "cnfgnn"
    (pkg / "conf").mkdir(parents=True)
    (pkg / "conf" / "config.yaml").write_text("x: 1\n")
    (pkg / "bundled").mkdir()
    (pkg / "bundled" / "README.md").write_text("data\n")
    monkeypatch.delenv(paths.ENV_CONF, raising=False)
    monkeypatch.setattr(paths, "_package_dir", lambda: pkg)
    assert paths.conf_dir() == pkg / "conf" and paths.data_dir() == pkg / "bundled"
    (pkg / "conf" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="no conf directory.*CNFGNN_CONF"):
        paths.conf_dir()


def test_flower_files_and_node_state_go_to_the_working_directory(monkeypatch, tmp_path):
    for key in ("FLWR_HOME", "TMPDIR", "RAY_TMPDIR", "CNFGNN_STATE_ROOT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    env = flower_environment()
    assert env["FLWR_HOME"] == str(tmp_path / ".flwr")
    assert env["TMPDIR"] == env["RAY_TMPDIR"] == str(tmp_path / ".tmp")
    assert state_root(make_cfg("engine=simulation")) == tmp_path / ".tmp" / "node_state"


def test_wheel_carries_conf_and_data_not_tests(tmp_path):
    """``pip wheel`` of (a copy of) the checkout: configs and bundled data inside the package."""
    src = tmp_path / "src"  # setuptools writes build/ and *.egg-info/ where it builds
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("cnfgnn", "conf", "data"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for extra in (src / "data").iterdir():  # downloads in the checkout stay out of the copy
        if extra.is_dir() and extra.name not in ("los_loop", "metr_la", "pems_bay"):
            shutil.rmtree(extra)
    try:  # build with this environment's setuptools when it is recent enough (offline, fast)
        local = int(version("setuptools").split(".")[0]) >= 68
    except PackageNotFoundError:
        local = False
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            *(["--no-build-isolation"] if local else []),
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("cnfgnn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cnfgnn/conf/config.yaml" in names
    assert "cnfgnn/conf/dataset/los_loop.yaml" in names
    assert "cnfgnn/bundled/README.md" in names
    shipped = {str(p.relative_to(ROOT / "data")) for p in (ROOT / "data").glob("*/*.gz")}
    assert {f"cnfgnn/bundled/{s}" for s in shipped} <= names
    assert not any(n.startswith(("tests/", "conf/", "data/")) for n in names)
    assert Path(wheel).stat().st_size < 5e6
