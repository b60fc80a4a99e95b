"""Flower backends: codec, ClientApp state, the simulation against the in-process engine.

Two harnesses:

* ``LoopbackGrid``: a Grid that calls the real ClientApp in this process, one ``Context`` per
  node; with ``fresh_process=True`` every message starts from an empty worker cache, as in a
  deployment (state comes back from the node's disk). No Ray, fast.
* the real Flower simulation (``engine=simulation``: Ray actors, ``run_simulation``).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from cnfgnn.config import RUN_CONFIG_KEY, compose_cfg, overrides_for
from cnfgnn.data.loaders import load_dataset
from cnfgnn.experiment import build_workers, run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import NodeWorker
from cnfgnn.flower import client_app, node_state, secagg
from cnfgnn.flower.codec import pack, unpack, wire_nbytes
from cnfgnn.results import read_predictions
from tests.helpers import (
    QUIET,
    ROOT,
    TINY,
    TRAINING_UP,
    LoopbackGrid,
    RecordingEngine,
    check_private,
    in_process_federation,
    inprocess_and_loopback,
    make_cfg,
    same_state,
)

METRICS = ("rmse", "mae", "masked_mae", "masked_rmse", "masked_mae_h3", "masked_rmse_h12")


# ---------------------------------------------------------------------- codec
def test_codec_round_trip_keeps_types_dtypes_and_shapes():
    payload = {
        P.H_C: np.random.default_rng(0).normal(size=(5, 3, 1, 8)).astype(np.float32),
        P.NODES: np.array([4, 7, 9], np.int64),
        P.ACTIVE: np.array([True, False, True]),
        P.SCALER_MEAN: np.array(3.5),  # 0-d array stays 0-d
        P.SCALER_STD: np.float64(1.25),  # numpy scalar stays a numpy scalar
        P.NUM_EXAMPLES: np.zeros(0, np.int64),
        "w.fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        P.ROUND: 3,
        P.STEP: 10**12,
        P.SPLIT: P.VAL,
        P.SENSOR_IDS: "a,b,c",
        "flag": True,
        "lr": 0.001,
    }
    back = unpack(pack(payload))
    assert back.keys() == payload.keys()
    for key, value in payload.items():
        assert type(back[key]) is type(value), key
        if isinstance(value, (np.ndarray, np.generic)):
            assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
            np.testing.assert_array_equal(back[key], value)
        else:
            assert back[key] == value
    assert P.payload_nbytes(back) == P.payload_nbytes(payload)
    assert wire_nbytes(pack(payload)) >= P.payload_nbytes(payload)[0]
    assert unpack(pack({})) == {}
    with pytest.raises(TypeError):
        pack({"bad": [1, 2]})


def test_client_app_has_one_handler_per_message_type():
    registered = set(client_app.app._registered_funcs)  # noqa: SLF001 (Flower keeps them here)
    assert registered == set(P.MESSAGE_TYPES) | {P.IDENTIFY, f"{secagg.SECAGG_TYPE}.default"}


def test_pyproject_declares_the_flower_app():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert project["components"] == {
        "serverapp": "cnfgnn.flower.server_app:app",
        "clientapp": "cnfgnn.flower.client_app:app",
    }
    assert project["config"] == {RUN_CONFIG_KEY: ""}


# ---------------------------------------------------------------------- config
def test_overrides_reproduce_the_config(tmp_path):
    cfg = make_cfg(*TINY, f"output_root={tmp_path}", "federation.nodes_per_client=2")
    with open_dict(cfg):  # changed after composing: only the exact form reproduces it
        cfg.federation.lr = 0.0123
    text = overrides_for(cfg, tmp_path / "run")
    got = OmegaConf.to_container(compose_cfg(text), resolve=True)
    want = OmegaConf.to_container(cfg, resolve=True) | {"run_dir": str(tmp_path / "run")}
    assert got == want
    cli = list(TINY) + [f"output_root={tmp_path}"]  # as typed: the short form is kept
    short = overrides_for(make_cfg(*cli), tmp_path / "run", cli)
    assert "~dataset" not in short and "run_dir=" in short


# ---------------------------------------------------------------------- node state
def _configured_workers(cfg, nodes_per_client=2):
    data, workers, orch = in_process_federation(cfg, nodes_per_client)
    orch.round = 1
    orch.local_phase()
    enc = orch.encode_phase(P.TRAIN, orch.train_clients, "encode")
    return data, workers, orch, orch._assemble(enc, P.H_C, orch.col)


def test_split_step_is_read_only_and_state_restores_exactly(tiny_cfg):
    """The ClientApp skips saving after READ_ONLY messages; a restored worker answers alike."""
    cfg = tiny_cfg
    with open_dict(cfg):
        cfg.federation.reset_client_optimizer = False  # keep (and persist) Adam's state
    data, workers, orch, h_c = _configured_workers(cfg)
    worker = workers[orch.train_clients[0]]
    batch = np.arange(3, 11)
    h_g = orch.server.forward(h_c[batch], orch.train_graph).detach().numpy()
    payload = {
        P.BATCH: batch,
        P.ROUND: 1,
        P.STEP: 5,
        P.H_G: orch._slice(h_g, orch.train_clients[0], orch.col),
    }
    before = worker.state_dict()
    reply = worker.handle(P.SPLIT_STEP, payload)
    same_state(before, worker.state_dict())
    worker.handle(P.SL_ENCODE, {P.BATCH: batch})
    same_state(before, worker.state_dict())
    assert {P.SPLIT_STEP, P.HELLO, P.STATS, P.PREDICT_ENCODE, P.PREDICT, P.SL_ENCODE} >= P.READ_ONLY

    fresh = build_workers(cfg, data, torch.device("cpu"))[orch.train_clients[0]]
    fresh.load_state_dict(worker.state_dict())
    again = fresh.handle(P.SPLIT_STEP, payload)
    for key in reply:
        np.testing.assert_array_equal(again[key], reply[key])
    a = worker.handle(P.LOCAL_TRAIN, {P.ROUND: 2, P.STEP: 7})
    b = fresh.handle(P.LOCAL_TRAIN, {P.ROUND: 2, P.STEP: 7})
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_node_state_writes_what_changed_and_reads_what_it_lacks(tiny_cfg, tmp_path, monkeypatch):
    """``node_state``: a save writes one file with the entries that changed (and deletes the
    files no entry refers to any more), a process holding an older version reads only the
    newest file, a fresh one every file; a save that fails leaves the last complete state."""
    _, workers, orch, _ = _configured_workers(tiny_cfg)
    worker = workers[orch.train_clients[0]]
    directory = tmp_path / "client_0"

    def on_disk() -> list[str]:
        return sorted(p.name for p in directory.iterdir())

    first = node_state.save(directory, node_state.Held(0, worker, {}, {}), 1)
    entries = set(first.parts)
    assert entries == set(worker.state_dict()) and set(first.parts.values()) == {1}
    assert on_disk() == ["v1.pt"]
    other = NodeWorker(worker.series, worker.cfg, worker.device, store=worker.store)
    stale = node_state.load(directory, node_state.latest(directory), other)  # at version 1
    same_state(stale.snapshot, first.snapshot)

    worker.handle(P.LOCAL_TRAIN, {P.ROUND: 2, P.STEP: 7})
    changed = {
        k for k, v in worker.state_dict().items() if not node_state.same(v, first.snapshot[k])
    }
    assert "model" in changed and "h_c" not in changed and changed < entries
    second = node_state.save(directory, first, 2)
    assert {k for k, v in second.parts.items() if v == 2} == changed
    assert on_disk() == ["v1.pt", "v2.pt"]  # v1 still holds the unchanged entries

    read: list[str] = []
    torch_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda f, *a, **k: read.append(Path(f).name) or torch_load(f, *a, **k)
    )
    stored = node_state.latest(directory)
    assert stored is not None and set(stored.entries) == changed
    caught_up = node_state.load(directory, stored, other, stale)
    assert caught_up.version == 2 and caught_up.worker is other
    assert read == ["v2.pt"]
    same_state(caught_up.snapshot, worker.state_dict())
    for key, value in worker.state_dict()["model"].items():
        torch.testing.assert_close(other.net.state_dict()[key], value, rtol=0, atol=0)
    read.clear()
    fresh = NodeWorker(worker.series, worker.cfg, worker.device)
    node_state.load(directory, node_state.latest(directory), fresh)
    assert sorted(read) == ["v1.pt", "v2.pt"]
    monkeypatch.undo()

    worker.handle(P.LOCAL_TRAIN, {P.ROUND: 3, P.STEP: 9})
    third = node_state.save(directory, second, 3)
    assert {k for k, v in third.parts.items() if v == 3} == changed
    assert on_disk() == ["v1.pt", "v3.pt"]  # every entry of v2 superseded: its file deleted

    worker.handle(P.LOCAL_TRAIN, {P.ROUND: 4, P.STEP: 11})
    monkeypatch.setattr(
        node_state, "_write", lambda path, obj: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        node_state.save(directory, third, 4)
    monkeypatch.undo()
    assert on_disk() == ["v1.pt", "v3.pt"]
    stored = node_state.latest(directory)
    assert stored is not None and stored.version == 3
    fresh = node_state.load(directory, stored, NodeWorker(worker.series, worker.cfg, worker.device))
    same_state(fresh.snapshot, third.snapshot)


def test_node_state_refuses_the_earlier_layout(tmp_path):
    """A state directory of the layout before one file per version (``state.pt`` and a
    file per entry) is refused with the fix, not read as empty (which would start over)."""
    assert node_state.latest(tmp_path / "missing") is None
    directory = tmp_path / "client_0"
    directory.mkdir()
    torch.save({"version": 3, "parts": {"model": 3}}, directory / "state.pt")
    with pytest.raises(RuntimeError, match="earlier cnfgnn.*start a new run"):
        node_state.latest(directory)


def test_node_state_equality_is_exact():
    same = node_state.same
    t = torch.tensor([1.0, 2.0])
    assert same({"a": [t, (1, "x")], "b": None}, {"a": [t.clone(), (1, "x")], "b": None})
    assert not same(t, t.double())  # dtype
    assert not same(t, t[:1])  # shape
    assert not same(torch.tensor([float("nan")]), torch.tensor([float("nan")]))  # written again
    assert not same([1, 2], (1, 2)) and not same({"a": 1}, {"a": 1, "b": 2})
    assert same(np.arange(3), np.arange(3)) and not same(np.arange(3), np.arange(3.0))
    assert not same(t, t.numpy()) and not same(1, 1.0)


@pytest.mark.parametrize("actors", [0, 2], ids=["fresh_process", "two_actors"])
def test_client_app_over_loopback_grid_equals_inprocess(
    flower_env, task_identity, monkeypatch, actors
):
    """ServerApp + ClientApp code = in-process: with a fresh process per message (every
    message reads the whole state from disk), and with two processes that each hold the
    workers they last served (a message on the other one reads only what changed since,
    and a save writes only what changed)."""
    tmp_path = flower_env
    loads: list[bool] = []  # per load: did this process hold an older version?
    written: dict[str, list[int]] = {}  # client dir -> entries per save, in order
    load, write = node_state.load, node_state._write

    def counting_load(directory, stored, worker, held=None):
        loads.append(held is not None)
        return load(directory, stored, worker, held)

    def counting_write(path, obj):
        written.setdefault(path.parent.name, []).append(len(obj[node_state.ENTRIES]))
        write(path, obj)

    monkeypatch.setattr(node_state, "load", counting_load)
    monkeypatch.setattr(node_state, "_write", counting_write)
    ref, final = inprocess_and_loopback(
        tmp_path, task_identity, *TINY, "federation.nodes_per_client=2", actors=actors
    )
    assert loads and any(loads) == bool(actors)  # older workers brought up to date
    for counts in written.values():  # a save writes only the entries that changed
        assert counts[0] == max(counts) and min(counts) < counts[0], counts
    for key in METRICS:
        assert final["test"][key] == pytest.approx(ref["test"][key], rel=1e-5, abs=1e-6), key
    assert final["bytes"] == ref["bytes"]
    state = tmp_path / "state" / str(task_identity)
    assert sorted(p.name for p in state.iterdir()) == ["client_0", "client_1", "client_2"]
    rounds = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").open()]
    assert rounds[-1]["wire_bytes"][P.SPLIT_STEP]["up"] > 0


def test_client_app_prepares_its_worker_at_identification(flower_env, task_identity, monkeypatch):
    """With ``engine.prepare_at_identify`` (the simulation's default) a ClientApp builds its
    worker when asked who it is, and the run's first message uses that worker: over a whole
    run, one worker per client, all built before round 1."""
    import sys

    from flwr.app import Message

    from cnfgnn.flower import server_app

    cfg = make_cfg(
        *TINY, "federation.nodes_per_client=2", f"output_root={flower_env}", "engine=simulation"
    )
    assert cfg.engine.prepare_at_identify
    overrides = overrides_for(cfg, flower_env / "run")
    grid = LoopbackGrid(overrides, num_nodes=3, run_id=task_identity, fresh_process=False)
    built: list[int] = []
    new_worker = client_app._new_worker
    monkeypatch.setattr(
        client_app,
        "_new_worker",
        lambda cfg, context: (
            built.append(int(context.node_config["partition-id"])) or new_worker(cfg, context)
        ),
    )
    nodes = grid.get_node_ids()
    asks = [Message(pack({}), dst_node_id=n, message_type=P.IDENTIFY) for n in nodes]
    replies = grid.pull_messages(grid.push_messages(asks))
    assert [unpack(r.content)[P.PARTITION_ID] for r in replies] == [0, 1, 2]
    assert sorted(built) == [0, 1, 2] and "torch._dynamo" in sys.modules
    final = server_app.run_server(grid, compose_cfg(overrides), run_id=None, **QUIET)
    assert sorted(built) == [0, 1, 2] and final["test"]["rmse"] > 0


def test_a_failed_preparation_does_not_fail_identification(
    flower_env, task_identity, monkeypatch, caplog
):
    """A SuperNode whose worker cannot be built (here: a fourth partition of a three-client
    federation) still says who it is; the failure is logged, and its first real message
    reports it to the server."""
    from flwr.app import Message

    cfg = make_cfg(
        *TINY, "federation.nodes_per_client=2", f"output_root={flower_env}", "engine=simulation"
    )
    overrides = overrides_for(cfg, flower_env / "run")
    grid = LoopbackGrid(overrides, num_nodes=4, run_id=task_identity, fresh_process=False)
    nodes = grid.get_node_ids()
    asks = [Message(pack({}), dst_node_id=n, message_type=P.IDENTIFY) for n in nodes]
    with caplog.at_level("WARNING", logger="cnfgnn.flower.client_app"):
        replies = grid.pull_messages(grid.push_messages(asks))
    assert [unpack(r.content)[P.PARTITION_ID] for r in replies] == [0, 1, 2, 3]
    assert "client 3: preparing at identification failed" in caplog.text
    train = Message(pack({P.ROUND: 1, P.STEP: 0}), dst_node_id=nodes[3], message_type=P.LOCAL_TRAIN)
    (reply,) = grid.pull_messages(grid.push_messages([train]))
    assert reply.has_error() and "partition 3 of 4" in reply.error.reason


# ---------------------------------------------------------------------- simulation
def test_simulation_equals_inprocess_and_keeps_series_private(flower_env):
    tmp = flower_env
    args = (*TINY, "federation.nodes_per_client=2")
    rec = {}

    def keep_workers(engine):
        rec["workers"] = engine.workers
        return engine

    ref, _ = run_experiment(
        make_cfg(*args, f"output_root={tmp}/a"),
        progress=lambda s: None,
        engine_wrapper=keep_workers,
    )

    def record(engine):
        rec["engine"] = RecordingEngine(engine)
        return rec["engine"]

    final, writer = run_experiment(
        make_cfg(*args, f"output_root={tmp}/b", "engine=simulation"),
        progress=lambda s: None,
        engine_wrapper=record,
    )
    assert final["engine"] == "simulation" and final["nodes"]["clients"] == 3
    for key in METRICS:
        assert final["test"][key] == pytest.approx(ref["test"][key], rel=1e-5, abs=1e-6), key
    assert final["best_round"] == ref["best_round"]
    assert final["bytes"] == ref["bytes"]  # payload bytes: identical payloads on both engines
    rounds = writer.rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["failures"] == 0
        assert r["wire_bytes"][P.LOCAL_TRAIN]["up"] > 0
    assert final["wire_bytes_total"] >= sum(
        v.get("up_tensor", 0) + v.get("down_tensor", 0) for v in final["bytes"].values()
    )
    assert not (tmp / "state").exists() or not any((tmp / "state").iterdir())  # cleaned up
    data = load_dataset(make_cfg(*args).dataset)
    scaler = next(iter(rec["workers"].values())).scaler
    assert final["predictions"]["released_to_server"] is False  # no forecast (default config)
    kept = read_predictions(writer.dir)  # the simulated nodes kept them in <run>/node_store
    assert list(kept["sensor_ids"]) == final["predictions"]["sensors"]
    assert not (writer.dir / "predictions.npz").exists()
    check_private(
        rec["engine"].received, data, scaler, TRAINING_UP, (P.WEIGHTS_PREFIX, P.ERR_PREFIX)
    )


def test_simulation_leaves_out_failing_and_silent_clients(flower_env):
    """One client raises in local training, one does not answer in time during evaluation.

    The timeout leaves room for Ray's actors to start on a loaded 2-core machine (with 4 s,
    no client answered the first message under a load average of 19; with 15 s, none at a
    load average of 12)."""
    tmp = flower_env
    faults = (
        "++engine.fault=[{partition:1,message_type:train.local},"
        "{partition:4,message_type:evaluate.decode,mode:sleep,seconds:70}]"
    )
    cfg = make_cfg(
        *TINY,
        f"output_root={tmp}",
        "engine=simulation",
        "federation.rounds=1",
        "federation.nodes_per_client=1",
        "engine.timeout_s=30",
        faults,
    )
    final, writer = run_experiment(cfg, progress=lambda s: None)
    data = load_dataset(cfg.dataset)
    seen = {(f["client"], f["phase"]) for f in final["failures"]}
    assert (1, "local") in seen and (4, "val") in seen, seen
    for f in final["failures"]:
        assert f["sensors"] == [data.sensor_ids[f["client"]]]
    failed_local = [f for f in final["failures"] if f["client"] == 1][0]
    assert "injected fault" in failed_local["reason"]
    assert any("no reply within" in f["reason"] for f in final["failures"] if f["client"] == 4)
    assert writer.rounds()[-1]["failures"] >= 2
    assert np.isfinite(final["test"]["rmse"])


@pytest.mark.slow
def test_simulation_207_supernodes(flower_env):
    """One SuperNode per sensor at METR-LA's size: small data, one round, few server steps."""
    tmp = flower_env
    cfg = make_cfg(
        "dataset=synthetic",
        "dataset.num_nodes=207",
        "dataset.days=2",
        "model.hidden_size=16",
        "model.gn.mlp_hidden=32",
        "model.gn.latent_size=16",
        "federation.rounds=1",
        "federation.nodes_per_client=1",
        "federation.server_batch_size=256",
        "federation.eval_batch_size=512",
        f"output_root={tmp}",
        "engine=simulation",
    )
    final, writer = run_experiment(cfg, progress=print)
    assert final["nodes"] == {"total": 207, "train": 207, "clients": 207}
    assert final["failures"] == [] and np.isfinite(final["test"]["rmse"])
    assert final["round_trips"][P.SPLIT_STEP] >= 1
    print(
        json.dumps(
            {
                k: final[k]
                for k in ("round_trips", "round_trip_seconds", "wire_bytes_total", "bytes_total")
            }
        )
    )
    assert os.path.exists(writer.dir / "final.json")
