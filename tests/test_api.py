"""The Python API (cnfgnn/api.py, docs/api.md): compose, train, forecast, compare."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cnfgnn
from cnfgnn.shell import UsageError
from tests.helpers import ROOT, TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CNFGNN run trained through the API, where a comparison would put it."""
    out = tmp_path_factory.mktemp("api")
    cfg = cnfgnn.compose([*TINY, f"output_root={out}"])
    run = cnfgnn.train(cfg, run_dir=out / "cmp" / "cnfgnn" / "seed42", progress=False)
    return {"run": run, "out": out}


def test_import_cnfgnn_is_light():
    code = (
        "import sys, cnfgnn; "
        "print(sorted(m for m in ('torch', 'flwr', 'hydra') if m in sys.modules))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert set(cnfgnn.__all__) >= {"compose", "train", "forecast", "compare", "Run"}
    assert (ROOT / "cnfgnn" / "py.typed").exists()


def test_compose_is_the_cli_composition_and_names_close_keys():
    cfg = cnfgnn.compose(["experiment=synthetic_cnfgnn", "federation.rounds=2"])
    assert cfg.federation.rounds == 2 and cfg.threads is None and cfg.device == "auto"
    with pytest.raises(UsageError, match="federation.rounds"):
        cnfgnn.compose(["federation.roundz=2"])
    with pytest.raises(UsageError, match="synthetic_cnfgnn"):  # Hydra alone would ignore it
        cnfgnn.compose(["experiment=synthetic_cnfgn"])


def test_train_returns_the_run_its_final_metrics_and_rounds(trained):
    run = trained["run"]
    assert run.dir.is_dir() and (run.dir / "final.json").exists()
    assert math.isfinite(run.final["test"]["rmse"])
    assert run.final == cnfgnn.load_run(run.dir).final
    m = run.metrics
    assert isinstance(m, pd.DataFrame)
    assert list(m["round"]) == list(range(1, run.final["rounds_run"] + 1))
    assert {"train_loss", "val_rmse", "seconds.local", "bytes.split.up_tensor"} <= set(m.columns)
    assert m["val_loss"].min() == pytest.approx(run.final["best_val_loss"])
    log = (run.dir / "run.log").read_text()  # the full log, a summary line per round
    assert log.count("round   ") == run.final["rounds_run"]
    assert "DEBUG cnfgnn.progress: local:" in log


def test_forecast_is_cnfgnn_forecasts_tidy_frame(trained, tmp_path):
    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.forecast.cli import run as forecast_cli

    run = trained["run"]
    data = load_dataset(run.config.dataset)
    at = data.timestamps[len(data.timestamps) // 2]
    df = cnfgnn.forecast(run.dir, at=str(at))
    h = int(run.config.dataset.out_steps)
    assert list(df.columns) == ["sensor_id", "timestamp", "horizon", "forecast", "observed"]
    assert len(df) == data.num_nodes * h and set(df["sensor_id"]) == set(data.sensor_ids)
    step = pd.Timedelta(minutes=data.interval_minutes)
    assert (df["timestamp"] == at + df["horizon"] * step).all()
    col = {s: i for i, s in enumerate(data.sensor_ids)}
    t = {ts: i for i, ts in enumerate(data.timestamps)}
    truth = [
        data.speed[t[ts], col[s]] if data.mask[t[ts], col[s]] else np.nan
        for s, ts in zip(df["sensor_id"], df["timestamp"])
    ]
    np.testing.assert_allclose(df["observed"], truth, rtol=1e-5)
    summary = forecast_cli([str(run.dir), f"at={at}", f"out={tmp_path}"], progress=lambda s: None)
    cli = pd.read_csv(summary["files"][0])
    np.testing.assert_allclose(df["forecast"], cli["forecast"], rtol=1e-4, atol=1e-4)


def test_forecast_and_compare_stay_callable_next_to_their_modules():
    import cnfgnn.compare as compare_module
    import cnfgnn.forecast.cli  # binds cnfgnn.forecast to the package

    assert callable(cnfgnn.forecast) and callable(cnfgnn.compare)
    assert callable(compare_module.main)


def test_compare_returns_the_comparison_table(trained):
    run, out = trained["run"], trained["out"]
    table = cnfgnn.compare(
        ["cnfgnn"], [*TINY, f"output_root={out}"], budget_epochs=2, out=out / "cmp"
    )  # the run above is the finished method: kept
    assert list(table["method"]) == ["cnfgnn"]
    assert table["rmse"].iloc[0] == pytest.approx(run.final["test"]["rmse"], rel=1e-3)
    assert Path(table["run_dir"].iloc[0]).resolve() == run.dir.resolve()
