"""Test forecasts for plots: kept on the nodes by default, sent up only under an opt-in that
the run's outputs mark; the report plots them from the nodes' files where it can reach them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cnfgnn import report
from cnfgnn.experiment import run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.results import NODE_STORE, read_predictions
from tests.helpers import TINY, RecordingEngine, make_cfg


class SentAndReceived(RecordingEngine):
    """Also keeps every request the server sends."""

    def __init__(self, inner):
        super().__init__(inner)
        self.sent = []

    def send(self, mtype, payloads):
        self.sent.extend((mtype, c, p) for c, p in payloads.items())
        return super().send(mtype, payloads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny CNFGNN run (2 sensors per client) with and without the opt-in."""
    out = {}
    for name, extra in (("kept", ()), ("released", ("predictions.release=true",))):
        rec = {}

        def wrap(engine, rec=rec):
            rec["workers"] = engine.workers
            rec["engine"] = SentAndReceived(engine)
            return rec["engine"]

        root = tmp_path_factory.mktemp(name)
        cfg = make_cfg(*TINY, "federation.nodes_per_client=2", f"output_root={root}", *extra)
        final, writer = run_experiment(cfg, progress=lambda s: None, engine_wrapper=wrap)
        out[name] = {"final": final, "dir": writer.dir, **rec}
    return out


def test_by_default_no_forecast_leaves_a_node(runs):
    run = runs["kept"]
    assert not [m for m, r in run["engine"].received if P.FORECAST in r]
    assert not [m for m, _, p in run["engine"].sent if P.RELEASE in p]
    pred = run["final"]["predictions"]
    assert pred["released_to_server"] is False and "file" not in pred
    assert json.loads((run["dir"] / "final.json").read_text())["predictions"] == pred
    assert not (run["dir"] / "predictions.npz").exists()
    # each asked sensor's node wrote its own file, and only those sensors were kept
    files = sorted(p.name for p in (run["dir"] / NODE_STORE / "forecasts").iterdir())
    assert files == sorted(f"{s}.npz" for s in pred["sensors"]) and len(files) == 4
    asked = [(c, p) for m, c, p in run["engine"].sent if P.REPORT in p]
    assert asked and all(m == P.EVALUATE for m, _, p in run["engine"].sent if P.REPORT in p)
    hosted = {c: set(w.series.nodes.tolist()) for c, w in run["workers"].items()}
    for c, p in asked:  # a node is asked only about sensors it hosts, never all of a group here
        assert set(p[P.REPORT_NODES].tolist()) <= hosted[c]
    assert any(len(p[P.REPORT_NODES]) < len(hosted[c]) for c, p in asked)


def test_release_opt_in_sends_the_same_forecasts_and_is_marked(runs):
    kept, rel = runs["kept"], runs["released"]
    for key in ("rmse", "mae", "masked_mae"):  # the opt-in changes nothing else
        assert rel["final"]["test"][key] == kept["final"]["test"][key]
    pred = rel["final"]["predictions"]
    assert pred["released_to_server"] is True and pred["file"] == "predictions.npz"
    assert json.loads((rel["dir"] / "final.json").read_text())["predictions"]["released_to_server"]
    up = [r[P.FORECAST] for m, r in rel["engine"].received if P.FORECAST in r]
    assert sum(f.shape[2] for f in up) == len(pred["sensors"]) == 4  # asked-for sensors only
    on_server = read_predictions(rel["dir"])  # predictions.npz
    on_nodes = read_predictions(kept["dir"])  # the default run's node files
    assert list(on_server["sensor_ids"]) == list(on_nodes["sensor_ids"]) == pred["sensors"]
    np.testing.assert_array_equal(on_server["t_index"], on_nodes["t_index"])
    np.testing.assert_array_equal(on_server["forecast"], on_nodes["forecast"])
    assert (rel["dir"] / NODE_STORE / "forecasts").is_dir()  # the nodes keep their copy too


def test_a_node_refuses_a_release_its_config_does_not_allow(runs):
    worker = runs["kept"]["workers"][0]
    h_c = worker.h_c[P.TEST]
    store = runs["kept"]["dir"] / NODE_STORE / "forecasts"
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    with pytest.raises(PermissionError, match="predictions.release"):
        worker.handle(
            P.EVALUATE,
            {
                P.SPLIT: P.TEST,
                P.H_G: np.zeros(tuple(h_c.shape), np.float32),
                P.REPORT: np.arange(3, dtype=np.int64),
                P.RELEASE: True,
            },
        )
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before  # refused before any work


def test_report_plots_forecasts_from_node_files_and_says_when_it_cannot(runs, tmp_path):
    table, files = report.write_report([runs["kept"]["dir"]], tmp_path / "here")
    assert tmp_path / "here" / "plots" / "forecasts.png" in files
    assert "unavailable" not in table and "release" not in table
    remote = tmp_path / "remote" / "run"  # as a deployment: the nodes' disks are elsewhere
    shutil.copytree(runs["kept"]["dir"], remote, ignore=shutil.ignore_patterns(NODE_STORE))
    table, files = report.write_report([remote], tmp_path / "there")
    assert not (tmp_path / "there" / "plots" / "forecasts.png").exists()
    assert "forecast plot unavailable for CNFGNN" in table
    assert "forecast plot unavailable" in (tmp_path / "there" / "comparison.md").read_text()
    notes = report.forecast_notes([report.load_run(runs["released"]["dir"])])
    assert len(notes) == 1 and "predictions.release=true" in notes[0]
