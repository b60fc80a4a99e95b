"""Federated inference and ``cnfgnn-forecast``: equal to the evaluation code, equal on both
engines, private, robust to silent sensors, and clear about bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from cnfgnn.data.loaders import load_dataset
from cnfgnn.experiment import build_workers, run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation.engines import InProcessEngine
from cnfgnn.federation.inference import Forecaster, load_trained
from cnfgnn.federation.rounds import ServerGraph
from cnfgnn.forecast import cli
from cnfgnn.forecast.outputs import COLUMNS
from tests.helpers import INFERENCE_UP, TINY, RecordingEngine, check_private, make_cfg, same_state

ARGS = (*TINY, "federation.nodes_per_client=2")  # 6 sensors on 3 clients
QUIET = dict(progress=lambda s: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CNFGNN run (2 rounds): its directory, final metrics, config and data."""
    root = tmp_path_factory.mktemp("fc")
    cfg = make_cfg(*ARGS, f"output_root={root}")
    final, writer = run_experiment(cfg, run_dir=root / "run", **QUIET)
    return {"dir": writer.dir, "final": final, "cfg": cfg, "data": load_dataset(cfg.dataset)}


def _test_ends(run) -> np.ndarray:
    """Window ends of the run's test split."""
    from cnfgnn.data.windows import split_starts

    d, s = run["cfg"].dataset, run["cfg"].dataset.split
    starts = split_starts(run["data"].num_steps, d.in_steps, d.out_steps, s.train, s.val, s.test)
    return starts["test"] + int(d.in_steps) - 1


def _forecaster(run, engine=None, workers=None):
    cfg, data = run["cfg"], run["data"]
    workers = workers if workers is not None else build_workers(cfg, data, torch.device("cpu"))
    graph = ServerGraph(data.adjacency, list(data.sensor_ids), data.locations)
    trained = load_trained(run["dir"] / "checkpoint.pt", cfg)
    return Forecaster(cfg, engine or InProcessEngine(workers), graph, trained, **QUIET), workers


def _ts(run, i) -> str:
    return str(run["data"].timestamps[int(i)])


# ---------------------------------------------------------------------- equal to evaluation
def test_rolling_over_the_test_split_reproduces_the_runs_test_metrics(trained, tmp_path):
    ends = _test_ends(trained)
    summary = cli.run(
        [
            str(trained["dir"]),
            f"rolling.start={_ts(trained, ends[0])}",
            f"rolling.end={_ts(trained, ends[-1])}",
            f"out={tmp_path}",
        ],
        **QUIET,
    )
    test = trained["final"]["test"]
    assert summary["period"]["windows"] == len(ends)
    for key in (
        "rmse",
        "mae",
        "masked_mae",
        "masked_rmse",
        "masked_mape",
        "masked_mae_h3",
        "masked_rmse_h12",
        "rmse_h6",
    ):
        assert summary["metrics"][key] == pytest.approx(test[key], rel=1e-5), key
    ref = trained["final"]["test_per_horizon"]
    for key in ("masked_mae", "rmse"):
        np.testing.assert_allclose(summary["per_horizon"][key], ref[key], rtol=1e-5)
    table = pd.read_csv(next(tmp_path.glob("rolling_*.csv")))
    assert list(table["horizon"]) == list(range(1, 13))
    assert next(tmp_path.glob("rolling_*.png")).stat().st_size > 10_000


@pytest.mark.parametrize("method", ["fedavg", "central"])
def test_global_gru_baselines_forecast_in_one_round_trip(method, tmp_path):
    """No graph embedding: nodes encode and decode in one PREDICT; same test metrics."""
    cfg = make_cfg(
        *ARGS,
        f"federation={method}",
        "model=gru_63k",
        "model.hidden_size=8",
        "federation.rounds=1",
        f"output_root={tmp_path}",
    )
    final, writer = run_experiment(cfg, run_dir=tmp_path / "run", **QUIET)
    run = {"cfg": cfg, "data": load_dataset(cfg.dataset)}
    ends = _test_ends(run)
    rec = {}

    def wrap(engine):
        rec["e"] = RecordingEngine(engine)
        return rec["e"]

    summary = cli.run(
        [
            str(writer.dir),
            f"rolling.start={_ts(run, ends[0])}",
            f"rolling.end={_ts(run, ends[-1])}",
            f"out={tmp_path}",
        ],
        engine_wrapper=wrap,
        **QUIET,
    )
    for key in ("rmse", "masked_mae", "masked_rmse_h12"):
        assert summary["metrics"][key] == pytest.approx(final["test"][key], rel=1e-5), key
    assert P.PREDICT_ENCODE not in {m for m, _ in rec["e"].received}


def test_forecasts_equal_the_evaluation_decoding_of_the_same_windows(trained):
    """Same h_c, same GN over all sensors, same decoder as NodeWorker.evaluate on test."""
    fc, workers = _forecaster(trained)
    ends = _test_ends(trained)[::17]
    result = fc.forecast(ends)
    data = trained["data"]
    tm = fc.trained
    # reference: the evaluation path (ENCODE of the test split, GN, decode as evaluate does)
    enc = {
        c: w.handle(P.ENCODE, {P.SPLIT: P.TEST} | P.weights_to_payload(tm.theta))
        for c, w in workers.items()
    }
    h_c = np.zeros((len(_test_ends(trained)), data.num_nodes) + enc[0][P.H_C].shape[2:], np.float32)
    for c, w in workers.items():
        h_c[:, w.series.nodes] = enc[c][P.H_C]
    h_g = fc.server.embed_all(h_c, fc.server.graph(data.adjacency), 128)
    pos = torch.as_tensor(np.arange(0, len(h_c), 17))
    for w in workers.values():
        _, x_last, y_tod, _, _ = w._gather(P.TEST, pos.expand(w.num_nodes, -1))
        with torch.no_grad():
            pred = w.model.decode(
                x_last, y_tod, w.h_c[P.TEST][pos], torch.as_tensor(h_g[pos][:, w.series.nodes])
            )[..., 0]
        want = w.scaler.inverse_transform(pred).numpy()
        np.testing.assert_allclose(
            result.forecast[:, :, w.series.nodes], want, rtol=1e-5, atol=1e-4
        )
    assert result.answered.all() and not result.missing


def test_predict_handlers_leave_the_node_state_unchanged(trained):
    fc, workers = _forecaster(trained)
    fc.setup()
    w = workers[1]
    before = w.state_dict()
    ends = np.array([30, 200])
    h_c = w.handle(P.PREDICT_ENCODE, {P.ENDS: ends})[P.H_C]
    out = w.handle(P.PREDICT, {P.ENDS: ends, P.H_G: np.zeros_like(h_c)})
    assert set(out) == {P.FORECAST} and out[P.FORECAST].shape == (2, 12, w.num_nodes)
    same_state(before, w.state_dict())
    with pytest.raises(ValueError, match="history"):
        w.handle(P.PREDICT_ENCODE, {P.ENDS: np.array([5])})


# ---------------------------------------------------------------------- outputs
def test_forecast_csv_png_and_observed_from_local_data(trained, tmp_path):
    data = trained["data"]
    at = 500
    summary = cli.run([str(trained["dir"]), f"at={_ts(trained, at)}", f"out={tmp_path}"], **QUIET)
    frame = pd.read_csv(
        tmp_path / f"forecast_{data.timestamps[at]:%Y%m%d-%H%M}.csv", parse_dates=["timestamp"]
    )
    assert tuple(frame.columns) == COLUMNS and len(frame) == 12 * data.num_nodes
    first = frame[frame["sensor_id"] == data.sensor_ids[2]].sort_values("horizon")
    assert list(first["timestamp"]) == list(data.timestamps[at + 1 : at + 13])
    obs = np.where(data.mask[at + 1 : at + 13, 2], data.speed[at + 1 : at + 13, 2], np.nan)
    np.testing.assert_allclose(first["observed"].to_numpy(), obs, atol=1e-4)
    fc, _ = _forecaster(trained)
    np.testing.assert_allclose(
        first["forecast"].to_numpy(), fc.forecast([at]).forecast[0, :, 2], atol=1e-4
    )
    assert (tmp_path / f"forecast_{data.timestamps[at]:%Y%m%d-%H%M}.png").stat().st_size > 10_000
    assert summary["answered"] == data.num_nodes and summary["missing_sensors"] == []

    latest = cli.run([str(trained["dir"]), f"out={tmp_path}"], **QUIET)  # default: last step
    frame = pd.read_csv(latest["files"][0], parse_dates=["timestamp"])
    assert frame["observed"].isna().all() and frame["forecast"].notna().all()
    assert frame["timestamp"].min() > data.timestamps[-1]
    assert latest["issued_at"] == str(data.timestamps[-1])


# ---------------------------------------------------------------------- silent sensors
class SilentClient:
    """Engine wrapper: one client never answers the inference requests."""

    def __init__(self, inner, client):
        self.inner, self.client = inner, client

    def client_ids(self):
        return self.inner.client_ids()

    def send(self, mtype, payloads):
        replies = self.inner.send(mtype, payloads)
        if mtype in (P.PREDICT_ENCODE, P.PREDICT) and self.client in replies:
            replies[self.client] = P.ClientFailure("no reply within 1 s")
        return replies


def test_silent_sensors_are_reported_and_left_out_of_the_graph_network(trained):
    workers = build_workers(trained["cfg"], trained["data"], torch.device("cpu"))
    fc, _ = _forecaster(trained, SilentClient(InProcessEngine(workers), 1), workers)
    ends = np.array([300, 301, 700])
    result = fc.forecast(ends)
    lost = workers[1].series.nodes
    assert result.missing_sensors == [trained["data"].sensor_ids[i] for i in lost]
    assert np.isnan(result.forecast[:, :, lost]).all()
    assert result.missing[0]["sensors"] == result.missing_sensors
    # the rest equals a federation where that client does not exist: GN on the subgraph
    others = {c: w for c, w in workers.items() if c != 1}
    ref, _ = _forecaster(trained, InProcessEngine(others), others)
    want = ref.forecast(ends)
    keep = np.setdiff1d(np.arange(trained["data"].num_nodes), lost)
    np.testing.assert_allclose(result.forecast[:, :, keep], want.forecast[:, :, keep], atol=1e-6)
    full = _forecaster(trained)[0].forecast(ends)
    assert not np.allclose(full.forecast[:, :, keep], want.forecast[:, :, keep], atol=1e-6)


# ---------------------------------------------------------------------- privacy
def test_simulation_equals_inprocess_and_the_server_sees_no_series(trained, flower_env):
    """The same rolling forecasts through Flower simulation; every reply scanned."""
    tmp, data = flower_env, trained["data"]
    ends = _test_ends(trained)[:14]
    argv = [
        str(trained["dir"]),
        f"rolling.start={_ts(trained, ends[0])}",
        f"rolling.end={_ts(trained, ends[-1])}",
        "save_forecasts=true",
    ]
    rec = {}

    def record(name):
        def wrap(engine):
            rec[name] = RecordingEngine(engine)
            return rec[name]

        return wrap

    a = cli.run(argv + [f"out={tmp}/a"], engine_wrapper=record("inprocess"), **QUIET)
    b = cli.run(
        argv + [f"out={tmp}/b", "engine=simulation"], engine_wrapper=record("simulation"), **QUIET
    )
    assert b["engine"] == "simulation" and b["answered"] == data.num_nodes
    fa = pd.read_csv(next((tmp / "a").glob("*_forecasts.csv")))
    fb = pd.read_csv(next((tmp / "b").glob("*_forecasts.csv")))
    assert len(fa) == len(ends) * 12 * data.num_nodes
    pd.testing.assert_frame_equal(fa, fb, rtol=1e-6)
    assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-6)
    assert b["bytes"]["wire"]["total"] > 0
    scaler = load_trained(trained["dir"] / "checkpoint.pt", trained["cfg"]).scaler
    for name in ("inprocess", "simulation"):
        types = {m for m, _ in rec[name].received}
        assert {P.PREDICT_ENCODE, P.PREDICT} <= types, name
        check_private(rec[name].received, data, scaler, INFERENCE_UP)
    assert not (tmp / "state").exists() or not any((tmp / "state").iterdir())


# ---------------------------------------------------------------------- bad input
def _fails(capsys, *argv) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Fix:" in err, err
    return err


def test_bad_runs_exit_2_with_the_problem_and_the_fix(trained, tmp_path, capsys):
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(trained["dir"] / "config.yaml", empty / "config.yaml")
    assert "no checkpoint.pt" in _fails(capsys, empty)
    assert "no such run directory" in _fails(capsys, tmp_path / "nowhere")
    local = tmp_path / "local_run"
    local.mkdir()
    shutil.copy(trained["dir"] / "checkpoint.pt", local / "checkpoint.pt")
    cfg = OmegaConf.load(trained["dir"] / "config.yaml")
    cfg.federation.method = "fmtl"
    OmegaConf.save(cfg, local / "config.yaml")
    err = _fails(capsys, local)
    assert "federation.method=fmtl" in err and "separate model on every node" in err
    assert "may not change" in _fails(capsys, trained["dir"], "model.hidden_size=16")


def test_other_networks_exit_2(trained, tmp_path, capsys):
    run = trained["dir"]
    assert "sensors differ" in _fails(capsys, run, "dataset.num_nodes=7", f"out={tmp_path}")
    assert "graph differs" in _fails(capsys, run, "dataset.seed=1", f"out={tmp_path}")
    # a longer series of the same network is fine
    assert cli.main([str(run), "dataset.days=4", "at=2024-01-04 12:00", f"out={tmp_path}"]) == 0
    # older checkpoints without the network's fingerprint: compared with the training data
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(run / "config.yaml", old / "config.yaml")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    del ckpt["graph"], ckpt["scaler"]
    torch.save(ckpt, old / "checkpoint.pt")
    assert "sensors differ" in _fails(capsys, old, "dataset.num_nodes=7")
    at = _ts(trained, 400)
    assert cli.main([str(old), f"at={at}", f"out={tmp_path}/o"]) == 0  # scaler recomputed
    assert cli.main([str(run), f"at={at}", f"out={tmp_path}/n"]) == 0
    a, b = (pd.read_csv(next((tmp_path / d).glob("*.csv"))) for d in ("o", "n"))
    np.testing.assert_allclose(a["forecast"], b["forecast"], atol=1e-5)


def test_bad_times_exit_2(trained, tmp_path, capsys):
    run, ts = trained["dir"], trained["data"].timestamps
    out = f"out={tmp_path}"
    assert "outside the data" in _fails(capsys, run, "at=2030-01-01 00:00", out)
    assert "outside the data" in _fails(capsys, run, "at=2023-12-31 23:00", out)
    err = _fails(capsys, run, f"at={ts[5]}", out)
    assert "only 6 steps of history" in err and str(ts[11]) in err
    assert "grid" in _fails(capsys, run, "at=2024-01-02 08:03", out)
    assert "not a time stamp" in _fails(capsys, run, "at=yesterday-ish", out)
    assert "run past the end" in _fails(
        capsys, run, f"rolling.start={ts[-30]}", f"rolling.end={ts[-5]}", out
    )
    assert "either at=TIME or rolling.start" in _fails(
        capsys, run, f"at={ts[100]}", f"rolling.start={ts[100]}"
    )
    assert "no such engine config" in _fails(capsys, run, "engine=nosuch")
    assert not list(tmp_path.glob("*.csv"))  # nothing written for bad input
