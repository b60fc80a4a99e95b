"""The paper's baselines as configurations over the same modules (docs/method.md §6).

Each test checks what makes a baseline *that* baseline: local nodes never upload weights,
FMTL's regulariser is the paper's unsquared graph penalty, split learning's gradients equal
end-to-end autograd, the centralised model shares weights across nodes, and the federated
metrics equal a pooled computation from the forecasts.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.windows import split_starts
from cnfgnn.experiment import build_workers, run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import LocalSeries, NodeWorker
from cnfgnn.federation.rounds import FederationError
from cnfgnn.models.node_seq2seq import NodeSeq2Seq
from cnfgnn.results import read_predictions
from tests.helpers import QUIET, ROOT, TINY, RecordingEngine, in_process_federation, make_cfg


def _run(tmp_path, *overrides, wrap=None):
    cfg = make_cfg(*TINY, f"output_root={tmp_path}", *overrides)
    return run_experiment(cfg, engine_wrapper=wrap, **QUIET)


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "path", sorted((ROOT / "conf" / "experiment").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_experiment_file_composes_and_names_its_row(path):
    cfg = make_cfg(f"experiment={path.stem}")
    text = path.read_text()
    assert text.splitlines()[1].startswith("# "), "first comment line names the paper row"
    assert cfg.federation.method in {
        "cnfgnn",
        "fedavg",
        "local",
        "fmtl",
        "at_no_fedavg",
        "split_learning",
        "central",
    }
    if "gru_" in path.stem and "gn" not in path.stem:
        assert not cfg.model.graph_embedding
    if "727k" in path.stem:
        assert (cfg.model.hidden_size, cfg.model.num_layers) == (200, 2)
    if "inductive" in path.stem:
        assert cfg.federation.inductive_ratio == int(path.stem[-2:]) / 100


def test_model_presets_have_the_paper_sizes():
    for preset, expected in (("gru_63k", 62_501), ("gru_727k", 727_401), ("cnfgnn", 63_873)):
        m = make_cfg(f"model={preset}").model
        model = NodeSeq2Seq(
            1,
            m.input_size,
            m.output_size,
            m.hidden_size,
            m.num_layers,
            m.graph_embedding,
            m.horizon,
        )
        assert model.num_parameters_per_node() == expected, preset


# ---------------------------------------------------------------------- local
def test_local_nodes_never_upload_weights_and_train_apart(tmp_path):
    rec = {}

    def wrap(engine):
        rec["engine"] = RecordingEngine(engine)
        rec["workers"] = engine.workers
        return rec["engine"]

    final, _ = _run(
        tmp_path,
        "federation=local",
        "model=gru_63k",
        "federation.local_epochs=1",
        "federation.nodes_per_client=2",
        wrap=wrap,
    )
    for mtype, reply in rec["engine"].received:
        assert not any(k.startswith(P.WEIGHTS_PREFIX) for k in reply), mtype
    assert final["bytes"]["local"]["up_tensor"] == 0
    assert final["bytes"]["local"]["down_tensor"] == 0  # only the round-0 model went down
    w = rec["workers"][0].model.stacked_state()["readout.weight"]
    assert not torch.allclose(w[0], w[1]), "two local nodes ended with the same model"
    # grouping does not matter: each node trains alone either way
    alone, _ = _run(
        tmp_path / "b",
        "federation=local",
        "model=gru_63k",
        "federation.local_epochs=1",
        "federation.nodes_per_client=1",
    )
    assert alone["test"]["rmse"] == pytest.approx(final["test"]["rmse"], rel=1e-5)


def test_per_node_methods_refuse_inductive_runs(tmp_path):
    with pytest.raises(FederationError, match="cannot run inductively"):
        _run(tmp_path, "federation=local", "model=gru_63k", "federation.inductive_ratio=0.5")


def test_keep_and_restore_best_model_on_the_node(tiny_cfg):
    data = load_dataset(tiny_cfg.dataset)
    worker = build_workers(tiny_cfg, data, torch.device("cpu"))[0]
    worker.handle(P.KEEP_MODEL, {P.ACTION: P.KEEP_BEST})
    kept = {k: v.clone() for k, v in worker.model.state_dict().items()}
    with torch.no_grad():
        for p in worker.model.parameters():
            p.add_(1.0)
    worker.handle(P.KEEP_MODEL, {P.ACTION: P.RESTORE_BEST})
    for k, v in worker.model.state_dict().items():
        assert torch.equal(v, kept[k]), k
    with pytest.raises(ValueError, match="unknown"):
        worker.handle(P.KEEP_MODEL, {P.ACTION: "nonsense"})


# ---------------------------------------------------------------------- FMTL
def _series(cfg, k: int) -> LocalSeries:
    data = load_dataset(cfg.dataset)
    nodes = np.arange(k)
    return LocalSeries.from_arrays(
        nodes,
        [data.sensor_ids[i] for i in nodes],
        data.speed[:, nodes],
        data.mask[:, nodes],
        data.time_of_day(),
        cfg.dataset,
    )


def test_fmtl_term_is_the_unsquared_graph_penalty(tiny_cfg):
    cfg = make_cfg(*TINY, "federation=fmtl", "model=gru_63k", "federation.fmtl_lambda=0.3")
    worker = NodeWorker(_series(cfg, 2), cfg)
    names = [n for n, _ in worker.model.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    nbr = {
        n: torch.randn((3,) + p.shape[1:], generator=gen)
        for n, p in worker.model.named_parameters()
    }
    a = np.array([[0.5, 0.0, 1.0], [0.2, 0.7, 0.0]])
    payload = {P.NBR_PREFIX + n: v.numpy() for n, v in nbr.items()} | {P.NBR_WEIGHT: a}
    term = worker._fmtl_term(payload)()
    w = torch.cat([p.detach().flatten(1) for p in worker.model.parameters()], 1).double()
    wn = torch.cat([nbr[n].flatten(1) for n in names], 1).double()
    expected = 0.3 * (torch.as_tensor(a) * torch.cdist(w, wn)).sum(1)
    assert torch.allclose(term.double(), expected, rtol=1e-5)
    # at w_k == w_m the penalty and its gradient are 0, not NaN (round 1: all nodes equal)
    same = {P.NBR_PREFIX + n: p.detach()[0:1].numpy() for n, p in worker.model.named_parameters()}
    t0 = worker._fmtl_term(same | {P.NBR_WEIGHT: np.array([[1.0], [0.0]])})()
    t0.sum().backward()
    assert t0[0].item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in worker.model.parameters())


def test_fmtl_pulls_neighbours_together(tmp_path):
    def weights(method, lam):
        rec = {}

        def wrap(engine):
            rec["workers"] = engine.workers
            return engine

        _run(
            tmp_path / method,
            f"federation={method}",
            "model=gru_63k",
            "federation.local_epochs=1",
            "federation.rounds=3",
            f"federation.fmtl_lambda={lam}",
            "federation.nodes_per_client=6",
            wrap=wrap,
        )
        return torch.cat([p.detach().flatten(1) for p in rec["workers"][0].model.parameters()], 1)

    adj = load_dataset(make_cfg(*TINY).dataset).adjacency
    src, dst = np.nonzero(adj - np.diag(np.diag(adj)))

    def spread(w):
        return float((w[src] - w[dst]).norm(dim=1).mean())

    assert spread(weights("fmtl", 1.0)) < 0.8 * spread(weights("local", 0.0))


# ---------------------------------------------------------------------- split learning
def test_split_learning_gradients_equal_end_to_end_autograd(tiny_cfg):
    """One SL step through the 3-message protocol = autograd of encoder -> GN -> decoder."""
    cfg = make_cfg(
        *TINY,
        "federation=split_learning",
        "federation.nodes_per_client=2",
        "federation.batch_size=100000",
    )  # one batch: every training window
    data, workers, orch = in_process_federation(cfg)
    orch.round = 1
    gen = torch.Generator().manual_seed(1)  # nodes differ: no FedAvg in split learning
    with torch.no_grad():
        for w in workers.values():
            for p in w.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            w.optimizer = torch.optim.SGD(w.model.parameters(), lr=0.0)  # keeps .grad
    orch.server.optimizer = torch.optim.SGD(orch.server.gn.parameters(), lr=0.0)
    # reference: all nodes in one model, end to end
    ref = NodeWorker(_series(cfg, data.num_nodes), cfg)
    ref.configure({P.SCALER_MEAN: orch.scaler.mean, P.SCALER_STD: orch.scaler.std})
    ref.model.load_stacked_state(
        {
            n: torch.cat([w.model.stacked_state()[n] for w in workers.values()])
            for n in workers[0].model.stacked_state()
        }
    )
    gn = copy.deepcopy(orch.server.gn)
    s = len(ref.series.starts[P.TRAIN])
    x, x_last, y_tod, y, t = ref._gather(P.TRAIN, torch.arange(s).expand(data.num_nodes, -1))
    h_c = ref.model.encode(x)
    h_g = gn(h_c, *orch.train_graph)
    pred = ref.model.decode(x_last, y_tod, h_c, h_g, targets=y, teacher=ref._teacher("sl", 0, 0))
    per_node, _, _ = ref._loss(pred, y, t)
    per_node.sum().backward()

    orch.sl_epoch()
    got = {
        n: torch.cat([dict(w.model.named_parameters())[n].grad for w in workers.values()])
        for n in workers[0].model.stacked_state()
    }
    for n, p in ref.model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), n
    n_nodes = data.num_nodes
    for (n, p), q in zip(orch.server.gn.named_parameters(), gn.parameters()):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad / n_nodes, atol=1e-7, rtol=1e-4), n


# ---------------------------------------------------------------------- centralised
def test_central_model_is_one_shared_node_model(tiny_cfg):
    from cnfgnn.baselines.centralized import CentralModel

    cfg = make_cfg(*TINY, "federation=central")
    data = load_dataset(cfg.dataset)
    central = CentralModel(cfg, torch.device("cpu"))
    worker = NodeWorker(_series(cfg, data.num_nodes), cfg)
    worker.configure({P.SCALER_MEAN: np.asarray(50.0), P.SCALER_STD: np.asarray(10.0)})
    worker.model.load_global_state(central.node.node_state(0))
    x, x_last, y_tod, y, t = worker._gather(P.TEST, torch.arange(5).expand(data.num_nodes, -1))
    graph = central.server.graph(data.adjacency)
    got = central(x, x_last, y_tod, graph)
    h_c = worker.model.encode(x)
    want = worker.model.decode(x_last, y_tod, h_c, central.gn(h_c, *graph))[..., 0]
    assert got.shape == (5, cfg.dataset.out_steps, data.num_nodes)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("model", ["gru_63k", "cnfgnn"])
def test_central_baselines_train_and_write_the_same_outputs(tmp_path, model):
    final, writer = _run(tmp_path, "federation=central", f"model={model}", "federation.rounds=3")
    rounds = writer.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["val_loss"] < rounds[0]["val_loss"] * 1.05
    assert (final["parameters"]["server"] == 0) == (model == "gru_63k")
    assert json.loads((writer.dir / "final.json").read_text())["method"] == "central"
    assert final["bytes_total"] > 0  # centralising uploads the raw series
    assert (writer.dir / "predictions.npz").exists() and (writer.dir / "checkpoint.pt").exists()


# ---------------------------------------------------------------------- metrics
@pytest.mark.parametrize(
    "method,model", [("fedavg", "gru_63k"), ("central", "gru_63k"), ("cnfgnn", "cnfgnn")]
)
def test_federated_metrics_equal_pooled_computation(tmp_path, method, model):
    """Metrics summed per node and horizon = metrics computed from all forecasts at once."""
    final, writer = _run(
        tmp_path,
        f"federation={method}",
        f"model={model}",
        "federation.rounds=1",
        "predictions.sensors=100",
        "predictions.hours=1000",
        "federation.nodes_per_client=2",
    )
    cfg = make_cfg(*TINY)
    data = load_dataset(cfg.dataset)
    # federated: each node's own file under node_store/ (nothing sent up); central: on the server
    assert (writer.dir / "predictions.npz").exists() == (method == "central")
    pred_file = read_predictions(writer.dir)
    assert list(pred_file["sensor_ids"]) == list(data.sensor_ids)
    fc = pred_file["forecast"].astype(np.float64)  # [W, H, N]
    sp = cfg.dataset.split
    starts = split_starts(data.num_steps, 12, 12, sp.train, sp.val, sp.test)[P.TEST]
    assert len(pred_file["t_index"]) == len(starts) == fc.shape[0]
    t_out = pred_file["t_index"][:, None] + np.arange(12)  # [W, H]
    truth = data.speed[t_out].astype(np.float64)  # [W, H, N]
    mask = data.mask[t_out]
    err = fc - truth
    test = final["test"]
    assert test["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-5)
    assert test["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-5)
    assert test["masked_mae"] == pytest.approx(np.abs(err)[mask].mean(), rel=1e-5)
    for h in (3, 6, 12):
        m = mask[:, h - 1]
        assert test[f"masked_mae_h{h}"] == pytest.approx(np.abs(err[:, h - 1])[m].mean(), rel=1e-5)
        nz = m & (truth[:, h - 1] != 0)
        assert test[f"masked_mape_h{h}"] == pytest.approx(
            np.mean(np.abs(err[:, h - 1][nz] / truth[:, h - 1][nz])), rel=1e-5
        )
    assert np.isfinite(test["masked_mape"])


# ---------------------------------------------------------------------- Flower
@pytest.mark.parametrize(
    "method,model", [("local", "gru_63k"), ("fmtl", "gru_63k"), ("split_learning", "cnfgnn")]
)
def test_federated_baselines_through_the_flower_client_app(
    tmp_path, task_identity, monkeypatch, method, model
):
    """Every message of the baselines goes through the ClientApp (a fresh process per
    message, node state on disk) and gives the in-process result."""
    from cnfgnn.config import compose_cfg, overrides_for
    from cnfgnn.flower import server_app
    from tests.helpers import LoopbackGrid

    monkeypatch.setenv("CNFGNN_STATE_ROOT", str(tmp_path / "state"))
    args = (
        *TINY,
        f"federation={method}",
        f"model={model}",
        "federation.nodes_per_client=2",
        "federation.local_epochs=1",
        "federation.rounds=2",
    )
    ref, _ = run_experiment(make_cfg(*args, f"output_root={tmp_path}/a"), **QUIET)
    cfg = make_cfg(*args, f"output_root={tmp_path}/b", "engine=simulation")
    overrides = overrides_for(cfg, tmp_path / "b" / "run")
    grid = LoopbackGrid(overrides, num_nodes=3, run_id=task_identity, fresh_process=True)
    final = server_app.run_server(grid, compose_cfg(overrides), run_id=None, **QUIET)
    for key in ("rmse", "mae", "masked_mae_h3", "masked_mae_h12"):
        assert final["test"][key] == pytest.approx(ref["test"][key], rel=1e-5, abs=1e-6), key
    assert final["bytes"] == ref["bytes"]
