"""Silent sensors and input noise at inference: the fallback forecasts, what the GN
sees, seeded choices, and the ``cnfgnn-robustness`` outputs on tiny synthetic runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cnfgnn.data.loaders import load_dataset
from cnfgnn.experiment import NODE_STORE, build_workers, run_experiment
from cnfgnn.federation.engines import InProcessEngine
from cnfgnn.federation.inference import Forecaster, choose_silent, load_trained
from cnfgnn.federation.rounds import ServerGraph
from cnfgnn.forecast import robustness
from tests.helpers import TINY, make_cfg

ARGS = (*TINY, "federation.nodes_per_client=2")  # 6 sensors on 3 clients
LOCAL = (
    "federation=local",
    "model=gru_63k",
    *ARGS,
    "model.hidden_size=8",
    "federation.local_epochs=1",
)
QUIET = dict(progress=lambda s: None)


class Asked:
    """Engine wrapper that records which clients each message goes to."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def client_ids(self):
        return self.inner.client_ids()

    def send(self, mtype, payloads):
        self.log.append((mtype, set(payloads)))
        return self.inner.send(mtype, payloads)


ENDS = np.array([300, 301, 450, 700])


def _train(tmp_path_factory, name, args):
    root = tmp_path_factory.mktemp(name)
    cfg = make_cfg(*args, f"output_root={root}")
    final, writer = run_experiment(cfg, run_dir=root / "run", **QUIET)
    return {"dir": writer.dir, "final": final, "cfg": cfg, "data": load_dataset(cfg.dataset)}


@pytest.fixture(scope="module")
def cnfgnn_run(tmp_path_factory):
    return _train(tmp_path_factory, "rob_cnfgnn", ARGS)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    return _train(tmp_path_factory, "rob_local", LOCAL)


def _forecaster(run, data=None, engine_wrap=None):
    cfg, data = run["cfg"], data if data is not None else run["data"]
    store = run["dir"] / NODE_STORE if str(cfg.federation.method) == "local" else None
    workers = build_workers(cfg, data, torch.device("cpu"), store)
    engine = InProcessEngine(workers)
    if engine_wrap is not None:
        engine = engine_wrap(engine)
    graph = ServerGraph(data.adjacency, list(data.sensor_ids), data.locations)
    trained = load_trained(run["dir"] / "checkpoint.pt", cfg, per_node_ok=True)
    return Forecaster(cfg, engine, graph, trained, clock=data.time_of_day(), **QUIET)


def test_no_silence_and_no_noise_equal_the_plain_forecast(cnfgnn_run):
    fc = _forecaster(cnfgnn_run)
    plain = fc.forecast(ENDS)
    none_silent = fc.forecast(ENDS, silent=choose_silent(6, 0.0, 1), noise=0.0)
    np.testing.assert_array_equal(none_silent.forecast, plain.forecast)
    assert none_silent.silent_sensors == [] and none_silent.fallback == ""
    noisy = fc.forecast(ENDS, noise=0.5)  # the option does reach the nodes
    assert np.isfinite(noisy.forecast).all()
    assert np.abs(noisy.forecast - plain.forecast).max() > 1e-3


def test_silent_sensors_get_finite_forecasts_and_are_listed(cnfgnn_run):
    fc = _forecaster(cnfgnn_run)
    quiet = np.array([False, True, False, False, True, False])
    res = fc.forecast(ENDS, silent=quiet)
    ids = cnfgnn_run["data"].sensor_ids
    assert res.silent_sensors == [ids[1], ids[4]]
    assert res.fallback == "global_model+gn"
    assert np.isfinite(res.forecast).all()
    assert not res.answered[quiet].any() and res.answered[~quiet].all()
    # the answering sensors equal a GN over their own subgraph: the answered-only result
    # of a forecast where the silent ones are simply absent (docs/design.md §5 item 6)
    by_id = fc.forecast(ENDS, silent=[ids[1], ids[4]])
    np.testing.assert_array_equal(by_id.forecast, res.forecast)
    # a silent sensor's forecast depends on time of day and its neighbours, so it varies
    assert np.ptp(res.forecast[:, :, 1]) > 0


def test_the_gn_sees_only_the_answering_nodes(cnfgnn_run):
    """Rewriting a silenced sensor's series after training (all it would send now) changes
    no forecast, and the silenced sensors' clients send nothing (one hosts only silenced
    sensors). Their training means (sent at setup) are the only thing the fallback uses."""
    quiet = np.array([False, False, True, True, False, True])  # client 1 = sensors 2, 3
    ends = robustness.split_ends(cnfgnn_run["cfg"], cnfgnn_run["data"].num_steps, "test")[::40]
    ref = _forecaster(cnfgnn_run).forecast(ends, silent=quiet)
    changed = load_dataset(cnfgnn_run["cfg"].dataset)
    after = int(ends[0]) - 11  # first input step of the test windows asked for
    rs = np.random.default_rng(0)
    block = changed.speed[after:, quiet]
    changed.speed[after:, quiet] = rs.uniform(5, 80, block.shape).astype(np.float32)
    rec: list = []
    fc = _forecaster(cnfgnn_run, changed, lambda e: Asked(e, rec))
    fc.setup()
    rec.clear()
    got = fc.forecast(ends, silent=quiet)
    np.testing.assert_array_equal(got.forecast, ref.forecast)
    assert rec and all(1 not in asked for _, asked in rec)  # client 1: all silent, never asked
    assert any(2 in asked for _, asked in rec)
    # a mixed client (client 2 = sensors 4, 5) is asked, but sensor 5's h_c is dropped:
    # changing it must not matter (checked above), while changing an answering one does
    changed.speed[after:, 4] += 10.0
    moved = _forecaster(cnfgnn_run, changed).forecast(ends, silent=quiet)
    # (through the GN only: sensors 0, 1 live on another client; tiny model, small effect)
    assert np.abs(moved.forecast[:, :, :2] - ref.forecast[:, :, :2]).max() > 0


def test_silenced_choice_is_seeded_nested_and_sized():
    a, b = choose_silent(24, 0.3, 7), choose_silent(24, 0.3, 7)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 7
    assert not np.array_equal(a, choose_silent(24, 0.3, 8))
    lower = choose_silent(24, 0.1, 7)
    assert (a[lower]).all()  # nested across fractions for one seed
    assert not choose_silent(24, 0.0, 7).any()
    with pytest.raises(ValueError):
        choose_silent(24, 1.0, 7)


def test_noise_is_seeded_per_step_and_zero_noise_changes_nothing(cnfgnn_run):
    fc = _forecaster(cnfgnn_run)
    a = fc.forecast(ENDS, noise=0.2).forecast
    b = _forecaster(cnfgnn_run).forecast(ENDS, noise=0.2).forecast
    np.testing.assert_array_equal(a, b)
    # one window alone sees the same noisy readings as inside a batch
    one = fc.forecast(ENDS[2:3], noise=0.2).forecast
    np.testing.assert_allclose(one[0], a[2], atol=1e-5)


def test_gru_local_forecasts_with_each_nodes_kept_model(local_run):
    store = local_run["dir"] / NODE_STORE
    assert len(list(store.glob("*.pt"))) == 6  # one file per sensor, on the nodes' side
    ckpt = torch.load(local_run["dir"] / "checkpoint.pt", weights_only=False)
    assert "node_store" not in json.dumps(list(ckpt.keys()))
    fc = _forecaster(local_run)
    res = fc.forecast(ENDS)
    assert res.answered.all() and np.isfinite(res.forecast).all()
    # the per-node models reproduce the run's test metrics (same windows, same models)
    ends = robustness.split_ends(local_run["cfg"], local_run["data"].num_steps, "test")
    full = fc.forecast(ends)
    err = robustness.subset_errors(full.forecast, local_run["data"], ends, np.arange(6))
    assert err["rmse"] == pytest.approx(local_run["final"]["test"]["rmse"], rel=1e-4)
    # silent sensors: their training mean, from the STATS sums sent at setup
    quiet = choose_silent(6, 0.5, 3)
    sil = fc.forecast(ENDS, silent=quiet)
    assert sil.fallback == "historical_mean"
    d = local_run["data"]
    for i in np.flatnonzero(quiet):
        assert np.allclose(sil.forecast[:, :, i], sil.forecast[0, 0, i])
        assert 5.0 < sil.forecast[0, 0, i] < 90.0
    np.testing.assert_array_equal(sil.forecast[:, :, ~quiet], res.forecast[:, :, ~quiet])
    assert d.num_nodes == 6


def test_robustness_command_writes_csv_json_png(cnfgnn_run, local_run, tmp_path):
    out = tmp_path / "rob"
    summary = robustness.run(
        [
            str(cnfgnn_run["dir"]),
            str(local_run["dir"]),
            f"out={out}",
            "silence=0,0.5",
            "noise=0,0.5",
            "repeats=2",
        ],
        **QUIET,
    )
    rows = pd.read_csv(out / "robustness.csv")
    assert set(rows.method) == {"CNFGNN", "GRU local"}
    zero = rows[(rows.kind == "silence") & (rows.level == 0) & (rows.subset == "all")]
    for _, r in zero.iterrows():  # 0% silenced = the run's own test RMSE
        run = cnfgnn_run if r.method == "CNFGNN" else local_run
        assert r.rmse == pytest.approx(run["final"]["test"]["rmse"], rel=1e-4)
    half = rows[(rows.kind == "silence") & (rows.level == 0.5) & (rows.subset == "silent")]
    assert len(half) == 4 and (half.sensors == 3).all() and np.isfinite(half.rmse).all()
    noise0 = rows[(rows.kind == "noise") & (rows.level == 0)].set_index("method").rmse
    assert noise0["CNFGNN"] == pytest.approx(zero.set_index("method").rmse["CNFGNN"])
    assert (out / "robustness.png").stat().st_size > 10_000
    js = json.loads((out / "robustness.json").read_text())
    assert len(js["runs"][0]["silenced_sensors"]["0.5"]) == 2
    assert summary["runs"][1]["fallback"] == "historical_mean"


def test_robustness_bad_input_exits_2(cnfgnn_run, capsys):
    assert robustness.main([str(cnfgnn_run["dir"]), "silence=0,1.5"]) == 2
    assert "silence" in capsys.readouterr().err
    assert robustness.main(["silence=0"]) == 2


def test_forecast_cli_silent_and_noise_options(cnfgnn_run, tmp_path):
    from cnfgnn.forecast import cli

    data = cnfgnn_run["data"]
    at = str(data.timestamps[400])
    sid = data.sensor_ids[3]
    s = cli.run(
        [str(cnfgnn_run["dir"]), f"at={at}", f"out={tmp_path}", f"silent={sid}", "noise=0.1"],
        progress=lambda m: None,
    )
    assert s["silent_sensors"] == [sid] and s["fallback"] == "global_model+gn"
    assert s["missing_sensors"] == [] and s["noise"] == 0.1
    frame = pd.read_csv(next(tmp_path.glob("forecast_*.csv")), dtype={"sensor_id": str})
    rows = frame[frame.sensor_id == sid]
    assert len(rows) == 12 and np.isfinite(rows.forecast).all()
    assert cli.main([str(cnfgnn_run["dir"]), "silent=nope"]) == 2
