"""The CNFGNN engine: exact split learning, FedAvg, grouping invariance, privacy, bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from cnfgnn.data.loaders import load_dataset
from cnfgnn.experiment import run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import LocalSeries, NodeWorker
from cnfgnn.federation.rounds import initial_node_model
from cnfgnn.federation.server import fedavg
from cnfgnn.models.node_seq2seq import NodeSeq2Seq
from tests.helpers import (
    TINY,
    TRAINING_UP,
    RecordingEngine,
    check_private,
    in_process_federation,
    make_cfg,
)

NO_TEACHER = 10**9  # scheduled-sampling step at which p(teacher) is 0


def _setup(cfg, nodes_per_client=2):
    return in_process_federation(cfg, nodes_per_client)


def test_split_gradient_equals_end_to_end_autograd(tiny_cfg):
    """dL/dphi assembled from the nodes' dL/dh_G equals autograd through GN + decoders."""
    data, workers, orch = _setup(tiny_cfg)
    orch.round = 1
    enc = orch.encode_phase(P.TRAIN, orch.train_clients, "encode")
    h_c = orch._assemble(enc, P.H_C, orch.col)  # [S, N, L, H]
    batch = np.arange(5, 5 + 16)
    h_g = orch.server.forward(h_c[batch], orch.train_graph)
    replies = orch._send(
        "split",
        P.SPLIT_STEP,
        {
            c: {
                P.BATCH: batch,
                P.ROUND: 1,
                P.STEP: NO_TEACHER,
                P.H_G: orch._slice(h_g.detach().numpy(), c, orch.col),
            }
            for c in orch.train_clients
        },
    )
    grad = orch._assemble(replies, P.GRAD, orch.col) / data.num_nodes
    h_g.backward(torch.as_tensor(grad))
    split_grads = [p.grad.clone() for p in orch.server.gn.parameters() if p.grad is not None]

    # reference: one model over all nodes, one loss = mean over nodes of each node's MSE
    orch.server.gn.zero_grad()
    cfgm = tiny_cfg.model
    ref = NodeSeq2Seq(
        num_nodes=data.num_nodes,
        input_size=cfgm.input_size,
        output_size=cfgm.output_size,
        hidden_size=cfgm.hidden_size,
        num_layers=cfgm.num_layers,
        graph_embedding=True,
        horizon=cfgm.horizon,
    )
    ref.load_global_state({k: torch.as_tensor(v) for k, v in orch.theta.items()})
    w0 = workers[0]
    starts = w0.series.starts[P.TRAIN][batch]
    scaled = (data.speed - orch.scaler.mean) / orch.scaler.std
    feats = np.stack([scaled, np.broadcast_to(data.time_of_day()[:, None], scaled.shape)], -1)
    t = starts[:, None] + np.arange(24)
    win = torch.as_tensor(feats[t], dtype=torch.float32)  # [B, 24, N, 2]
    x, y = win[:, :12], win[:, 12:]
    with torch.no_grad():
        h_c_ref = ref.encode(x)
    np.testing.assert_allclose(h_c_ref.numpy(), h_c[batch], atol=1e-5)
    h_g_ref = orch.server.gn(h_c_ref, *orch.train_graph)
    pred = ref.decode(x[:, -1], y[..., 1], h_c_ref, h_g_ref)
    loss = (pred[..., 0] - y[..., 0]).square().mean((0, 1)).mean()
    loss.backward()
    ref_grads = [p.grad for p in orch.server.gn.parameters() if p.grad is not None]
    assert len(ref_grads) == len(split_grads) > 0
    for a, b in zip(split_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_fedavg_one_step_on_identical_data_equals_central_step(tiny_cfg):
    """Three nodes with the same series, one local Adam step each, averaged = one central step."""
    cfg = tiny_cfg
    with open_dict(cfg):
        cfg.model.graph_embedding = False
        cfg.federation.batch_size = 100000  # one batch = all windows
    data = load_dataset(cfg.dataset)
    col = np.repeat(data.speed[:, :1], 3, axis=1)
    series = LocalSeries.from_arrays(
        np.arange(3), ["a", "b", "c"], col, np.ones_like(col, bool), data.time_of_day(), cfg.dataset
    )
    worker = NodeWorker(series, cfg)
    theta0 = initial_node_model(cfg)
    mean, std = float(col.mean()), float(col.std())
    worker.configure(
        {P.SCALER_MEAN: np.float64(mean), P.SCALER_STD: np.float64(std)}
        | P.weights_to_payload(theta0)
    )
    reply = worker.local_train({P.ROUND: 1, P.STEP: NO_TEACHER})
    theta1 = fedavg([P.weights_from_payload(reply)], [reply[P.NUM_EXAMPLES]])

    m = cfg.model
    central = NodeSeq2Seq(
        num_nodes=1,
        input_size=m.input_size,
        output_size=m.output_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        graph_embedding=False,
        horizon=m.horizon,
    )
    central.load_global_state({k: torch.as_tensor(v) for k, v in theta0.items()})
    opt = torch.optim.Adam(central.parameters(), lr=cfg.federation.lr)
    starts = series.starts[P.TRAIN]
    feats = np.stack([(col[:, :1] - mean) / std, data.time_of_day()[:, None]], -1)
    win = torch.as_tensor(feats[starts[:, None] + np.arange(24)], dtype=torch.float32)
    pred = central(win[:, :12], win[:, 12:, :, 1])
    loss = (pred[..., 0] - win[:, 12:, :, 0]).square().mean()
    loss.backward()
    opt.step()
    for name, value in central.node_state(0).items():
        np.testing.assert_allclose(theta1[name], value.detach().numpy(), atol=2e-6, err_msg=name)


def test_grouping_does_not_change_results(tmp_path):
    """One client per sensor and all sensors in one client give the same run; ``null`` is
    all sensors in one client."""
    finals = []
    for k in (1, 6, "null"):
        cfg = make_cfg(*TINY, f"output_root={tmp_path}/{k}", f"federation.nodes_per_client={k}")
        final, _ = run_experiment(cfg, progress=lambda s: None)
        finals.append(final)
    a, b, c = finals
    assert a["nodes"]["clients"] == 6 and b["nodes"]["clients"] == 1
    assert c["nodes"]["clients"] == 1 and c["test"] == b["test"]
    for key in ("rmse", "mae", "masked_mae_h3", "masked_rmse_h12"):
        assert a["test"][key] == pytest.approx(b["test"][key], rel=1e-4), key


def test_server_never_receives_series_or_targets(tiny_cfg):
    rec = {}

    def wrap(engine):
        rec["engine"] = RecordingEngine(engine)
        rec["workers"] = engine.workers
        return rec["engine"]

    run_experiment(tiny_cfg, progress=lambda s: None, engine_wrapper=wrap)
    data = load_dataset(tiny_cfg.dataset)
    w = next(iter(rec["workers"].values()))
    check_private(
        rec["engine"].received, data, w.scaler, TRAINING_UP, (P.WEIGHTS_PREFIX, P.ERR_PREFIX)
    )


def test_measured_bytes_match_the_formula(tiny_cfg):
    final, writer = run_experiment(tiny_cfg, progress=lambda s: None)
    n = final["nodes"]["train"]
    rounds = writer.rounds()
    theta = sum(v.size for v in initial_node_model(tiny_cfg).values())
    s = load_dataset(tiny_cfg.dataset)
    from cnfgnn.data.windows import split_starts

    sp = tiny_cfg.dataset.split
    s_train = len(split_starts(s.num_steps, 12, 12, sp.train, sp.val, sp.test)["train"])
    hidden = tiny_cfg.model.hidden_size
    r_s = tiny_cfg.federation.server_epochs
    floats_per_round = 2 * n * theta + (2 + 2 * r_s) * n * s_train * hidden
    last = rounds[-1]["bytes"]
    measured = sum(
        last[p].get("down_tensor", 0) + last[p].get("up_tensor", 0)
        for p in ("local", "encode", "split", "embed")
    )
    assert measured == 4 * floats_per_round * len(rounds)


def test_outputs_and_resume_give_the_same_result(tmp_path):
    full, _ = run_experiment(
        make_cfg(*TINY, f"output_root={tmp_path}/a", "federation.rounds=4"), progress=lambda s: None
    )
    cut_cfg = make_cfg(*TINY, f"output_root={tmp_path}/b", "federation.rounds=2")
    _, writer = run_experiment(cut_cfg, progress=lambda s: None)
    for name in ("config.yaml", "metrics.jsonl", "final.json", "checkpoint.pt"):
        assert (writer.dir / name).exists(), name
    resumed_cfg = make_cfg(*TINY, f"output_root={tmp_path}/b", "federation.rounds=4", "resume=true")
    resumed, writer2 = run_experiment(resumed_cfg, run_dir=writer.dir, progress=lambda s: None)
    assert [r["round"] for r in writer2.rounds()] == [1, 2, 3, 4]
    assert resumed["test"]["rmse"] == pytest.approx(full["test"]["rmse"], rel=1e-5)
    assert resumed["best_round"] == full["best_round"]


def test_failing_client_is_left_out_and_logged(tiny_cfg):
    data, workers, orch = _setup(tiny_cfg, nodes_per_client=1)
    broken = workers[2]

    def boom(*a, **k):
        raise RuntimeError("sensor offline")

    broken.local_train = boom
    orch.round = 1
    out = orch.local_phase()
    assert np.isfinite(out["train_loss"])
    assert orch.failures and orch.failures[0]["client"] == 2
    assert orch.failures[0]["sensors"] == [data.sensor_ids[2]]
