"""A user's own CSV (10-minute steps, read from its timestamps) through train, test,
``cnfgnn-report``, ``cnfgnn-forecast`` and ``cnfgnn-compare``: every method to the end;
and a 15-minute CSV through CNFGNN with one client per sensor to a forecast."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from cnfgnn import compare, report
from cnfgnn.data.errors import DataError
from cnfgnn.experiment import run_experiment
from cnfgnn.forecast import cli as forecast_cli
from cnfgnn.results import read_predictions
from tests.helpers import make_cfg

STEP_MINUTES = 10  # not the 5 minutes of METR-LA / PEMS-BAY / Los-loop / synthetic
SENSORS = ["a1", "b2", "c3", "d4"]
QUIET = dict(progress=lambda s: None)
#: Tiny models and one round (the CSV sets the data; the method presets set the rest).
SMALL = (
    "model.hidden_size=8",
    "model.gn.mlp_hidden=16",
    "model.gn.latent_size=8",
    "federation.rounds=1",
    "federation.local_epochs=1",
    "federation.batch_size=64",
    "federation.server_batch_size=48",
    "federation.eval_batch_size=256",
    "threads=1",
    "federation.nodes_per_client=2",
)
#: Every method: the federated ones and the two centralised baselines (compare's presets).
METHODS = {name: list(m["overrides"]) for name, m in compare.compare_config([])[0].methods.items()}


def write_csv(folder: Path, steps: int, minutes: int = STEP_MINUTES) -> tuple[Path, Path]:
    """A wide series CSV (timestamps + one column per sensor, a morning dip, noise, a few
    empty cells) and an N x N adjacency CSV with a header of ids."""
    rng = np.random.default_rng(3)
    t = pd.date_range("2025-03-03", periods=steps, freq=f"{minutes}min")
    day = ((t.hour * 60 + t.minute).to_numpy() / 1440.0)[:, None]
    lag = np.arange(len(SENSORS))[None, :] * 0.01  # the dip travels downstream
    speed = 62 - 25 * np.exp(-((day - 0.33 - lag) ** 2) / 0.002) + rng.normal(0, 1.2, (steps, 4))
    frame = pd.DataFrame(speed.round(2), index=t, columns=SENSORS).astype(object)
    frame.iloc[rng.integers(0, steps, 6), rng.integers(0, 4, 6)] = ""  # missing readings
    frame.index.name = "timestamp"
    series = folder / "series.csv"
    frame.to_csv(series)
    adj = np.eye(4) + np.diag([0.6, 0.6, 0.6], 1)
    adjacency = folder / "adjacency.csv"
    pd.DataFrame(adj, columns=SENSORS).to_csv(adjacency, index=False)
    return series, adjacency


@pytest.fixture(scope="module")
def user_csv(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("user")
    series, adjacency = write_csv(folder, steps=3 * 144)  # 3 days of 10-minute steps
    return {"dir": folder, "series": series, "adjacency": adjacency}


def csv_args(data: dict[str, Path]) -> list[str]:
    return [
        "dataset=csv",
        f"dataset.series={data['series']}",
        f"dataset.adjacency={data['adjacency']}",
    ]


@pytest.fixture(scope="module")
def trained(user_csv) -> dict[str, Path]:
    """Every method trained one tiny round on the CSV, in-process: method -> run dir."""
    root = user_csv["dir"] / "runs"
    dirs = {}
    for name, preset in METHODS.items():
        cfg = make_cfg(*preset, *csv_args(user_csv), *SMALL, f"output_root={root}")
        _, writer = run_experiment(cfg, run_dir=root / name, **QUIET)
        dirs[name] = writer.dir
    return dirs


def test_every_method_trains_and_tests_on_the_csv(trained):
    assert set(trained) >= {
        "cnfgnn",
        "gru_local",
        "gru_fedavg",
        "gru_fmtl",
        "split_learning",
        "at_no_fedavg",
        "gru_central",
        "gru_gn_central",
    }
    for name, run in trained.items():
        final = json.loads((run / "final.json").read_text())
        assert math.isfinite(final["test"]["rmse"]) and final["test"]["rmse"] > 0, name
        assert final["interval_minutes"] == STEP_MINUTES, name  # read from the timestamps
        assert final["rounds_run"] >= 1 and final["best_round"] >= 1, name
        kept = read_predictions(run)  # test forecasts kept for plots (on the nodes' disks)
        if final.get("predictions"):
            assert kept is not None and np.all(np.diff(kept["t_index"]) == 1), name
            assert np.isfinite(kept["forecast"]).all(), name


def test_the_run_prints_horizons_in_the_datas_minutes(trained):
    from cnfgnn.cli import format_table

    table = format_table(json.loads((trained["cnfgnn"] / "final.json").read_text()))
    assert "30min" in table and "120min" in table and "15min" not in table


def test_report_on_the_csv_runs(trained, tmp_path):
    out = tmp_path / "rep"
    assert report.main([*(str(p) for p in trained.values()), f"out={out}"]) == 0
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert len(rows) == len(trained)
    for r in rows:
        final = json.loads((Path(r["run_dir"]) / "final.json").read_text())
        assert float(r["rmse"]) == pytest.approx(final["test"]["rmse"])
        assert float(r["interval_minutes"]) == STEP_MINUTES
    md = (out / "comparison.md").read_text()
    assert "30 / 60 / 120 min" in md  # horizons 3 / 6 / 12 of 10-minute steps
    for name in ("forecasts", "horizons", "validation", "bytes", "sensor_maps"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5_000, name


def test_forecast_from_a_csv_run(trained, user_csv, tmp_path):
    ts = pd.read_csv(user_csv["series"], usecols=[0]).iloc[:, 0]
    at = str(ts.iloc[-30])
    summary = forecast_cli.run([str(trained["cnfgnn"]), f"at={at}", f"out={tmp_path}"], **QUIET)
    assert summary["interval_minutes"] == STEP_MINUTES and summary["answered"] == len(SENSORS)
    table = pd.read_csv(next(tmp_path.glob("forecast_*.csv")), parse_dates=["timestamp"])
    one = table[table["sensor_id"] == SENSORS[0]].sort_values("horizon")
    steps = one["timestamp"].diff().dropna().unique()
    assert list(steps) == [pd.Timedelta(minutes=STEP_MINUTES)]
    assert one["timestamp"].iloc[0] == pd.Timestamp(at) + pd.Timedelta(minutes=STEP_MINUTES)
    assert np.isfinite(table["forecast"]).all()


def test_a_forecast_on_another_network_names_its_file(trained, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    series, adjacency = write_csv(other, steps=60)
    pd.DataFrame(np.eye(len(SENSORS)), columns=SENSORS).to_csv(adjacency, index=False)
    assert (
        forecast_cli.main(
            [
                str(trained["cnfgnn"]),
                f"dataset.series={series}",
                f"dataset.adjacency={adjacency}",
                f"out={tmp_path / 'fc'}",
            ]
        )
        == 2
    )
    assert f"{series}: its graph differs from the training run's" in capsys.readouterr().err


def test_compare_on_the_csv(user_csv, tmp_path):
    out = tmp_path / "cmp"
    code = compare.main(
        [
            *csv_args(user_csv),
            *SMALL,
            "compare.run=[cnfgnn]",
            "compare.budget_epochs=1",
            f"compare.out={out}",
            f"output_root={out}",
        ]
    )
    assert code == 0
    final = json.loads((out / "cnfgnn" / "seed42" / "final.json").read_text())
    assert final["interval_minutes"] == STEP_MINUTES and math.isfinite(final["test"]["rmse"])
    assert "30 / 60 / 120 min" in (out / "comparison.md").read_text()


def test_a_too_short_series_names_the_users_file(tmp_path):
    series, adjacency = write_csv(tmp_path, steps=19)
    cfg = make_cfg(
        "dataset=csv",
        f"dataset.series={series}",
        f"dataset.adjacency={adjacency}",
        *SMALL,
        f"output_root={tmp_path}",
    )
    with pytest.raises(
        DataError, match=re.escape(str(series)) + ": 19 time steps are fewer than one window"
    ):
        run_experiment(cfg, run_dir=tmp_path / "run", **QUIET)


def test_the_help_examples_of_compare_compose():
    examples = [
        line.split("#")[0].split()[1:]
        for line in compare.__doc__.splitlines()
        if line.strip().startswith("cnfgnn-compare ")
    ]
    assert any("dataset=csv" in e for e in examples)
    for args in examples:
        conf, runs = compare.compare_config(args)
        plans = compare.plan(conf, runs)  # composes every method's config: SystemExit if not
        cfg = compare.compose_run(next(iter(plans.values())))
        for arg in runs:  # every key the example sets is a real key of the run's config
            key, _, value = arg.partition("=")
            if "." in key:
                assert str(OmegaConf.select(cfg, key)) == value, (args, key)


def test_the_server_knows_the_step_length_from_the_data_or_the_shards(user_csv, tmp_path):
    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.data.shards import write_shards
    from cnfgnn.federation.graph import load_server_graph

    cfg = make_cfg(*csv_args(user_csv), *SMALL, "engine=deployment")
    graph, _ = load_server_graph(cfg)  # from the dataset
    assert graph.interval_minutes == STEP_MINUTES
    write_shards(load_dataset(cfg.dataset), tmp_path / "shards", nodes_per_client=2)
    cfg.engine.shards_dir = str(tmp_path / "shards")
    graph, clients = load_server_graph(cfg)  # a deployment's server: the shard manifest
    assert graph.interval_minutes == STEP_MINUTES and clients == 2


def test_kept_forecasts_cover_the_configured_hours_at_any_step_length():
    from cnfgnn.federation.rounds import report_selection

    cfg = make_cfg("predictions.sensors=2", "predictions.hours=24")
    for minutes, windows in ((5, 288), (10, 144), (60, 24), (0.5, 2880)):
        nodes, kept = report_selection(cfg, num_nodes=6, num_test=5000, interval_minutes=minutes)
        assert len(kept) == windows and list(nodes) == [0, 5], minutes
    assert len(report_selection(cfg, 6, 100, None)[1]) == 100  # step unknown: every window


def test_a_15_minute_csv_with_one_client_per_sensor_runs_to_a_forecast(tmp_path):
    """The other common step length, on the one-client-per-sensor path (the module's
    fixtures use 10 minutes and two sensors per client): CNFGNN trains and tests, the
    table and the forecasts speak in 15-minute steps."""
    from cnfgnn.cli import format_table

    series, adjacency = write_csv(tmp_path, steps=3 * 96, minutes=15)  # 3 days
    data = {"series": series, "adjacency": adjacency}
    small = [*SMALL[:-1], "federation.nodes_per_client=1"]
    cfg = make_cfg(*METHODS["cnfgnn"], *csv_args(data), *small, f"output_root={tmp_path}")
    final, writer = run_experiment(cfg, run_dir=tmp_path / "run", **QUIET)
    assert final["interval_minutes"] == 15 and final["nodes"]["clients"] == len(SENSORS)
    assert math.isfinite(final["test"]["rmse"])
    table = format_table(json.loads((writer.dir / "final.json").read_text()))
    assert "45min" in table and "180min" in table and "30min" not in table  # steps 3 and 12
    at = str(pd.read_csv(series, usecols=[0]).iloc[-20, 0])
    summary = forecast_cli.run([str(writer.dir), f"at={at}", f"out={tmp_path / 'fc'}"], **QUIET)
    assert summary["interval_minutes"] == 15 and summary["answered"] == len(SENSORS)
    fc = pd.read_csv(next((tmp_path / "fc").glob("forecast_*.csv")), parse_dates=["timestamp"])
    one = fc[fc["sensor_id"] == SENSORS[1]].sort_values("horizon")
    assert list(one["timestamp"].diff().dropna().unique()) == [pd.Timedelta(minutes=15)]
    assert one["timestamp"].iloc[-1] == pd.Timestamp(at) + pd.Timedelta(minutes=15 * 12)
