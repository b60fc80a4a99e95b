"""NodeSeq2Seq: parameter counts, equivalence with nn.GRU, group == alone, FedAvg helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from cnfgnn.models.node_seq2seq import GroupGRU, NodeSeq2Seq, teacher_forcing_prob

T_IN, HORIZON = 12, 12
CONFIGS = [  # hidden, layers, graph_embedding
    (8, 1, True),
    (8, 2, True),
    (8, 2, False),
]


class RefSeq2Seq(nn.Module):
    """One node's model written with torch.nn.GRU and nn.Linear (same parameter names)."""

    def __init__(self, hidden: int, layers: int, graph_embedding: bool):
        super().__init__()
        hd = 2 * hidden if graph_embedding else hidden
        self.encoder = nn.GRU(2, hidden, layers, batch_first=True)
        self.decoder = nn.GRU(2, hd, layers)
        self.readout = nn.Linear(hd, 1)

    def encode(self, x: Tensor) -> Tensor:  # [B, T, 2] -> [L, B, H]
        return self.encoder(x)[1]

    def forward(self, x, y_tod, h_g=None, targets=None, teacher=None) -> Tensor:
        # x [B, T, 2], y_tod [B, horizon], h_g [B, L, H], targets [B, horizon], teacher [horizon]
        h = self.encode(x)
        if h_g is not None:
            h = torch.cat([h, h_g.transpose(0, 1)], dim=-1)
        inp, preds = x[:, -1], []
        for t in range(y_tod.shape[1]):
            out, h = self.decoder(inp.unsqueeze(0), h)
            y = self.readout(out[0])  # [B, 1]
            preds.append(y)
            fed = targets[:, t : t + 1] if teacher is not None and teacher[t] else y
            inp = torch.cat([fed, y_tod[:, t : t + 1]], dim=-1)
        return torch.stack(preds, dim=1)  # [B, horizon, 1]


def make_data(b: int, k: int, hidden: int, layers: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T_IN, k, 2, generator=g)
    y_tod = torch.rand(b, HORIZON, k, generator=g)
    targets = torch.randn(b, HORIZON, k, generator=g)
    h_g = torch.randn(b, k, layers, hidden, generator=g)
    teacher = torch.rand(HORIZON, k, generator=g) < 0.5
    return x, y_tod, targets, h_g, teacher


def reference(model: NodeSeq2Seq, k: int, graph_embedding: bool) -> RefSeq2Seq:
    ref = RefSeq2Seq(model.hidden_size, model.num_layers, graph_embedding)
    ref.load_state_dict(model.node_state(k))
    return ref


def test_teacher_forcing_prob():
    assert teacher_forcing_prob(0, 1000.0) == pytest.approx(1000 / 1001)
    assert teacher_forcing_prob(6880, 1000.0) == pytest.approx(1000 / (1000 + math.exp(6.88)))
    assert (
        teacher_forcing_prob(10, 1.0) < teacher_forcing_prob(1, 1.0) < teacher_forcing_prob(0, 1.0)
    )
    assert teacher_forcing_prob(10**6, 1.0) == 0.0  # exp overflow guarded


@pytest.mark.parametrize(
    "hidden,layers,graph_embedding,count",
    [
        (64, 1, True, 63_873),
        (100, 1, False, 62_501),
        (200, 2, False, 727_401),
    ],
)
def test_parameter_counts(hidden, layers, graph_embedding, count):
    model = NodeSeq2Seq(3, hidden_size=hidden, num_layers=layers, graph_embedding=graph_embedding)
    assert model.num_parameters_per_node() == count
    assert sum(p.numel() for p in model.parameters()) == 3 * count
    ref = RefSeq2Seq(hidden, layers, graph_embedding)
    assert sum(p.numel() for p in ref.parameters()) == count
    assert {n: p.shape for n, p in ref.named_parameters()} == {
        n: v.shape for n, v in model.node_state(0).items()
    }


@pytest.mark.parametrize("hidden,layers,graph_embedding", CONFIGS)
@pytest.mark.parametrize("k", [1, 3])
def test_matches_torch_gru(hidden, layers, graph_embedding, k):
    torch.manual_seed(1)
    model = NodeSeq2Seq(k, hidden_size=hidden, num_layers=layers, graph_embedding=graph_embedding)
    x, y_tod, targets, h_g, teacher = make_data(5, k, hidden, layers)
    h_g = h_g if graph_embedding else None
    teacher[0] = True  # make sure some node is forced at some step...
    teacher[1] = False  # ...and some is not
    h_c = model.encode(x)
    free = model(x, y_tod, h_g)
    forced = model(x, y_tod, h_g, targets=targets, teacher=teacher)
    assert h_c.shape == (5, k, layers, hidden)
    assert free.shape == forced.shape == (5, HORIZON, k, 1)
    assert not torch.allclose(free, forced)
    with torch.no_grad():
        for node in range(k):
            ref = reference(model, node, graph_embedding)
            hg = h_g[:, node] if graph_embedding else None
            torch.testing.assert_close(
                h_c[:, node], ref.encode(x[:, :, node]).transpose(0, 1), atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                free[:, :, node], ref(x[:, :, node], y_tod[:, :, node], hg), atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                forced[:, :, node],
                ref(x[:, :, node], y_tod[:, :, node], hg, targets[:, :, node], teacher[:, node]),
                atol=1e-5,
                rtol=0,
            )


def test_group_gru_step_equals_forward():
    torch.manual_seed(2)
    gru = GroupGRU(3, 2, 6, num_layers=2)
    x = torch.randn(3, 4, 7, 2)
    h = torch.randn(2, 3, 4, 6)
    h_step = h
    for t in range(7):
        h_step = gru.step(x[:, :, t], h_step)
    torch.testing.assert_close(gru(x, h), h_step, atol=1e-6, rtol=0)


def test_node_gradients_are_separate():
    torch.manual_seed(3)
    model = NodeSeq2Seq(3, hidden_size=8)
    x, y_tod, targets, h_g, teacher = make_data(4, 3, 8, 1)
    pred = model(x, y_tod, h_g, targets, teacher)
    (pred[:, :, 1, 0] - targets[:, :, 1]).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad[[0, 2]].abs().max() == 0, name
        assert p.grad[1].abs().max() > 0, name


def _train(model: NodeSeq2Seq, data, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for x, y_tod, targets, h_g, teacher in data[:steps]:
        pred = model(x, y_tod, h_g, targets=targets, teacher=teacher)[..., 0]  # [B, H, K]
        per_node = (pred - targets).square().mean(dim=(0, 1))  # [K], each node's own MSE
        opt.zero_grad()
        per_node.sum().backward()
        opt.step()


@pytest.mark.parametrize("graph_embedding", [True, False])
def test_group_equals_alone(graph_embedding):
    k, hidden, steps = 4, 8, 6
    torch.manual_seed(4)
    group = NodeSeq2Seq(k, hidden_size=hidden, graph_embedding=graph_embedding)
    initial = [group.node_state(i) for i in range(k)]
    data = []
    for s in range(steps):
        x, y_tod, targets, h_g, teacher = make_data(6, k, hidden, 1, seed=10 + s)
        data.append((x, y_tod, targets, h_g if graph_embedding else None, teacher))
    _train(group, data, steps, lr=1e-2)
    for i in range(k):
        alone = NodeSeq2Seq(1, hidden_size=hidden, graph_embedding=graph_embedding)
        alone.load_global_state(initial[i])
        sl = slice(i, i + 1)
        own = [
            (x[:, :, sl], tod[:, :, sl], tg[:, :, sl], None if hg is None else hg[:, sl], tm[:, sl])
            for x, tod, tg, hg, tm in data
        ]
        _train(alone, own, steps, lr=1e-2)
        for name, value in alone.node_state(0).items():
            assert not torch.allclose(value, initial[i][name])  # training moved it
            torch.testing.assert_close(group.node_state(i)[name], value, atol=1e-5, rtol=0)


def test_stacked_models_are_copies_of_each_nodes_rows_in_order():
    torch.manual_seed(2)
    nets = [NodeSeq2Seq(k, hidden_size=8, num_layers=2) for k in (1, 3, 2)]
    out = NodeSeq2Seq.stacked(nets, trainable=False)
    assert out.num_nodes == 6 and out.architecture == nets[0].architecture
    assert not any(p.requires_grad for p in out.parameters())
    for name, p in out.named_parameters():
        want = torch.cat([n.get_parameter(name).detach() for n in nets])
        assert torch.equal(p, want), name
        assert p.data_ptr() != nets[0].get_parameter(name).data_ptr()  # new storage
    assert all(p.requires_grad for p in NodeSeq2Seq.stacked(nets, trainable=True).parameters())
    with pytest.raises(ValueError, match="different architectures"):
        NodeSeq2Seq.stacked([nets[0], NodeSeq2Seq(1, hidden_size=16, num_layers=2)], False)


@pytest.mark.parametrize("hidden, layers, graph_embedding", CONFIGS)
def test_node_groups_are_views_with_the_same_gradients(hidden, layers, graph_embedding):
    """Run by run (3 + 3 + 1 nodes): same predictions and weight gradients as the whole
    group, views of its storage; untrainable views give the same input gradient and
    compute no weight gradient."""
    k = 7
    torch.manual_seed(5)
    net = NodeSeq2Seq(k, hidden_size=hidden, num_layers=layers, graph_embedding=graph_embedding)
    x, y_tod, targets, h_g, teacher = make_data(5, k, hidden, layers, seed=3)
    h_g = h_g.requires_grad_(True) if graph_embedding else None
    pred = net(x, y_tod, h_g, targets=targets, teacher=teacher)
    whole = torch.autograd.grad(
        pred.square().sum(), [*net.parameters(), *([h_g] if h_g is not None else [])]
    )
    groups = net.node_groups(3, trainable=True)
    assert [rows for rows, _ in groups] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    frozen_views = [view for _, view in net.node_groups(3, trainable=False)]
    for (rows, view), frozen in zip(groups, frozen_views, strict=True):
        hg = None if h_g is None else h_g[:, rows]
        p = view(
            x[:, :, rows],
            y_tod[..., rows],
            hg,
            targets=targets[..., rows],
            teacher=teacher[:, rows],
        )
        torch.testing.assert_close(p, pred[:, :, rows], atol=1e-6, rtol=0)
        grads = torch.autograd.grad(p.square().sum(), list(view.parameters()))
        for g, g_all, (name, vp), wp in zip(
            grads, whole, view.named_parameters(), net.parameters()
        ):
            assert vp.data_ptr() == wp[rows].data_ptr(), name  # the same storage
            torch.testing.assert_close(g, g_all[rows], atol=1e-5, rtol=1e-5, msg=name)
        if graph_embedding:
            assert not any(q.requires_grad for q in frozen.parameters())
            hg = h_g[:, rows].detach().requires_grad_(True)
            out = frozen.decode(
                x[:, -1, rows],
                y_tod[..., rows],
                frozen.encode(x[:, :, rows]),
                hg,
                targets=targets[..., rows],
                teacher=teacher[:, rows],
            )
            (g_hg,) = torch.autograd.grad(out.square().sum(), hg)
            torch.testing.assert_close(g_hg, whole[-1][:, rows], atol=1e-5, rtol=1e-5)


def test_state_round_trips():
    torch.manual_seed(5)
    model = NodeSeq2Seq(3, hidden_size=8, num_layers=2)
    names = [n for n, _ in model.named_parameters()]
    assert "encoder.weight_ih_l0" in names and "decoder.bias_hh_l1" in names
    assert "readout.weight" in names and "readout.bias" in names

    stacked = model.stacked_state()
    assert all(v.shape[0] == 3 for v in stacked.values())
    other = NodeSeq2Seq(3, hidden_size=8, num_layers=2)
    other.load_stacked_state(stacked)
    for name, p in other.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name], atol=0, rtol=0)
    for i in range(3):
        for name, v in model.node_state(i).items():
            assert torch.equal(v, stacked[name][i])

    # clones, not views
    stacked["readout.bias"].add_(1.0)
    assert not torch.equal(model.stacked_state()["readout.bias"], stacked["readout.bias"])
    state1 = model.node_state(1)
    state1["readout.bias"].add_(1.0)
    assert not torch.equal(model.node_state(1)["readout.bias"], state1["readout.bias"])

    # global broadcast: every node becomes node 1
    glob = model.node_state(1)
    other.load_global_state(glob)
    for i in range(3):
        for name, v in other.node_state(i).items():
            assert torch.equal(v, glob[name])
    x, y_tod, _, h_g, _ = make_data(2, 3, 8, 2)
    out = other(x, y_tod, h_g)
    same = x[:, :, 1:2].expand_as(x).contiguous()
    out_same = other(same, y_tod[:, :, 1:2].expand_as(y_tod), h_g[:, 1:2].expand_as(h_g))
    torch.testing.assert_close(out_same[:, :, 0], out_same[:, :, 2], atol=0, rtol=0)
    torch.testing.assert_close(out_same[:, :, 1], out[:, :, 1], atol=1e-6, rtol=0)


def test_state_errors():
    model = NodeSeq2Seq(2, hidden_size=4)
    glob = model.node_state(0)
    with pytest.raises(KeyError):
        model.load_global_state({k: v for k, v in glob.items() if k != "readout.bias"})
    with pytest.raises(ValueError):
        model.load_global_state({**glob, "readout.bias": torch.zeros(2)})
    with pytest.raises(ValueError):
        model.load_stacked_state(glob)
    x, y_tod, targets, h_g, teacher = make_data(2, 2, 4, 1)
    with pytest.raises(ValueError):
        model(x, y_tod)  # graph embedding missing
    with pytest.raises(ValueError):
        model(x, y_tod, h_g, teacher=teacher)  # teacher without targets
    with pytest.raises(ValueError):
        NodeSeq2Seq(2, input_size=3, output_size=1)
