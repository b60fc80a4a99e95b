"""``cnfgnn-forecast ... engine=deployment``: the forecast exchange through a real loopback
Flower deployment (SuperLink + 2 SuperNodes on their own shards, ``flwr run``) equals the
in-process forecast for the same windows, and a failed start exits 2 leaving no process.
Marked ``deployment``; about two minutes on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.windows import split_starts
from cnfgnn.experiment import run_experiment
from cnfgnn.forecast import cli
from tests.helpers import TINY, make_cfg, processes_of

pytestmark = pytest.mark.deployment

# 6 sensors on 2 clients of 3, one round: only the forecast matters here
ARGS = (*TINY, "federation.nodes_per_client=3", "federation.rounds=1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CNFGNN run: its config and run directory."""
    root = tmp_path_factory.mktemp("fcdep")
    cfg = make_cfg(*ARGS, f"output_root={root}")
    _, writer = run_experiment(cfg, run_dir=root / "run", progress=lambda s: None)
    return cfg, writer.dir


def test_deployment_forecast_equals_inprocess(trained, tmp_path):
    cfg, run_dir = trained
    data = load_dataset(cfg.dataset)
    d, s = cfg.dataset, cfg.dataset.split
    ends = (
        split_starts(data.num_steps, d.in_steps, d.out_steps, s.train, s.val, s.test)["test"][:4]
        + int(d.in_steps)
        - 1
    )
    argv = [
        str(run_dir),
        f"rolling.start={data.timestamps[ends[0]]}",
        f"rolling.end={data.timestamps[ends[-1]]}",
        "save_forecasts=true",
    ]
    a = cli.run(argv + [f"out={tmp_path / 'a'}"], progress=lambda s: None)
    b = cli.run(argv + [f"out={tmp_path / 'b'}", "engine=deployment"], progress=print)

    assert b["engine"] == "deployment" and b["answered"] == data.num_nodes == 6
    assert b["missing_sensors"] == [] and b["missing"] == []
    fa = pd.read_csv(next((tmp_path / "a").glob("*_forecasts.csv")))
    fb = pd.read_csv(next((tmp_path / "b").glob("*_forecasts.csv")))
    assert len(fb) == len(ends) * 12 * 6 and fb["forecast"].notna().all()
    assert list(fa.columns) == list(fb.columns)
    assert (fa["sensor_id"] == fb["sensor_id"]).all()
    np.testing.assert_allclose(fb["forecast"], fa["forecast"], rtol=1e-5, atol=1e-5)
    assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-5)
    assert b["bytes"]["wire"]["total"] > 0  # went over Flower's wire

    # the outputs of the other engines, and the deployment's own logs
    base = tmp_path / "b" / "rolling_"
    assert {p.suffix for p in (tmp_path / "b").glob("rolling_*")} == {".csv", ".json", ".png"}
    assert (
        json.loads(next((tmp_path / "b").glob("rolling_*.json")).read_text())["engine"]
        == "deployment"
    ), base
    work = next((tmp_path / "b" / "deployment").iterdir())
    logs = work / "logs"
    for i in range(2):  # each SuperNode answered from its own shard
        assert "completed" in (logs / f"supernode_{i}.log").read_text()
    info = json.loads((logs / "deployment.json").read_text())
    assert info["supernodes"] == 2 and info["leftover_pids"] == []
    assert not (work / "shards").exists()  # removed after the run (logs kept)
    sec = b["seconds"]
    assert sec["startup"] > 0 and sec["forecast"] > 0
    print(
        f"deployment forecast: shards {sec['shards']:.2f} s, start-up {sec['startup']:.1f} s, "
        f"flwr run {sec['forecast']:.1f} s (connect {sec.get('connect', 0):.1f}, setup "
        f"{sec['setup']:.2f}, encode {sec['encode']:.2f}, server {sec['server']:.2f}, "
        f"decode {sec['decode']:.2f}), total {sec['total']:.1f} s"
    )
    assert processes_of(tmp_path) == [], "processes of this test still running"


def test_a_failed_start_exits_2_and_stops_its_processes(trained, tmp_path, capsys):
    _, run_dir = trained
    code = cli.main(
        [
            str(run_dir),
            f"out={tmp_path}",
            "engine=deployment",
            "engine.launch.startup_timeout_s=0.5",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "engine=deployment: not ready after 0.5 s" in err, err
    assert "Fix:" in err
    logs = next((tmp_path / "deployment").iterdir()) / "logs"
    assert json.loads((logs / "deployment.json").read_text())["leftover_pids"] == []
    assert "supernode_0.log" in {p.name for p in logs.iterdir()}  # it did start them
    assert not list(tmp_path.glob("forecast_*"))  # no outputs without forecasts
    assert processes_of(tmp_path) == [], "processes of this test still running"
