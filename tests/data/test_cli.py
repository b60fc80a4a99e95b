"""``cnfgnn-data`` info / shard through main(argv), and the installed console script."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnfgnn.data.cli import main
from tests.data._helpers import adjacency, series, write_pkl, write_wide_csv


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def info(capsys, *overrides):
    code, out, err = run(capsys, "info", *overrides)
    assert code == 0, err
    return json.loads(out)


def test_info_synthetic(capsys):
    s = info(capsys, "dataset.num_nodes=6", "dataset.days=2")
    assert s["kind"] == "synthetic" and s["nodes"] == 6 and s["steps"] == 576
    assert s["interval_minutes"] == 5.0 and s["start"] == "2024-01-01 00:00:00"
    assert s["windows"] == {"train": 387, "val": 55, "test": 111}
    assert s["self_loops"] == 6 and s["edges"] >= 6 and 0 < s["missing_fraction"] < 0.1


def test_info_csv_and_h5(capsys, tmp_path):
    write_wide_csv(tmp_path / "s.csv", series(t=100), blank=[(0, 0)])
    np.savetxt(tmp_path / "a.csv", adjacency(), delimiter=",")
    s = info(
        capsys,
        "dataset=csv",
        f"dataset.series={tmp_path / 's.csv'}",
        f"dataset.adjacency={tmp_path / 'a.csv'}",
    )
    assert (s["nodes"], s["steps"], s["edges"]) == (4, 100, 7)
    assert s["missing_fraction"] == pytest.approx(1 / 400)
    assert s["windows"] == {"train": 54, "val": 8, "test": 15}
    series(t=100).to_hdf(tmp_path / "x.h5", key="df")
    write_pkl(tmp_path / "adj.pkl", list(series().columns), adjacency())
    s = info(
        capsys,
        "dataset=metr_la",
        f"dataset.h5={tmp_path / 'x.h5'}",
        f"dataset.adj_pkl={tmp_path / 'adj.pkl'}",
        "dataset.locations=null",
    )
    assert (s["nodes"], s["steps"], s["kind"]) == (4, 100, "dcrnn_h5")
    assert s["missing_fraction"] == pytest.approx(2 / 400)  # the zeros


def test_info_real_files(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the bundled files are found from any working directory
    s = info(capsys, "dataset=los_loop")
    assert (s["nodes"], s["steps"], s["edges"], s["missing_fraction"]) == (207, 2016, 1722, 0.0)
    assert s["graph"] == "metr_la"
    s = info(capsys, "dataset=los_loop", "dataset.graph=los_adj")
    assert (s["edges"], s["graph"]) == (2833, "los_adj")
    s = info(capsys, "dataset=metr_la_json")
    assert (s["nodes"], s["steps"], s["edges"]) == (207, 100, 1722)
    assert s["missing_fraction"] == pytest.approx(0.0312, abs=1e-4)


def test_shard_command(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "shard",
        "dataset.num_nodes=5",
        "dataset.days=1",
        f"out={tmp_path / 'sh'}",
        "nodes_per_client=2",
    )
    assert code == 0, err
    assert json.loads(out)["clients"] == 3
    assert (tmp_path / "sh" / "client_0002" / "series.npz").exists()
    code, out, err = run(  # null: every sensor in one shard, reported as its size
        capsys,
        "shard",
        "dataset.num_nodes=5",
        "dataset.days=1",
        f"out={tmp_path / 'all'}",
        "nodes_per_client=null",
    )
    assert code == 0, err
    assert json.loads(out) | {"out": None} == {
        "out": None,
        "clients": 1,
        "nodes": 5,
        "nodes_per_client": 5,
    }


def test_errors_are_one_line_with_status_2(capsys, tmp_path):
    code, _, err = run(
        capsys,
        "info",
        "dataset=csv",
        f"dataset.series={tmp_path / 'no.csv'}",
        f"dataset.adjacency={tmp_path / 'a.csv'}",
    )
    assert code == 2 and "no.csv" in err and "not found" in err and "Fix:" in err
    code, _, err = run(capsys, "shard", "dataset.num_nodes=5")
    assert code == 2 and "out=DIR" in err
    code, _, err = run(capsys, "info", "dataset=nope")
    assert code == 2 and "dataset" in err
    code, _, err = run(capsys, "info", "dataset.days=0.05")  # 14 steps: no window
    assert code == 2 and "fewer than one window" in err
    code, _, err = run(capsys, "info", "dataset=csv")
    assert code == 2 and "dataset.series is not set" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "Usage" in err


def test_console_script(tmp_path):
    exe = Path(sys.executable).parent / "cnfgnn-data"
    if not exe.exists() and shutil.which("cnfgnn-data") is None:
        pytest.skip("console script not installed")
    cmd = [
        str(exe) if exe.exists() else "cnfgnn-data",
        "info",
        "dataset.num_nodes=4",
        "dataset.days=1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["nodes"] == 4
