"""The hand-written GRU backward (``_GRUCell``): gradcheck and gradients equal to nn.GRU's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnfgnn.models.node_seq2seq import GroupGRU, NodeSeq2Seq, _GRUCell
from tests.models.test_node_seq2seq import HORIZON, RefSeq2Seq, make_data


def _randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize("k,b,h", [(1, 1, 1), (2, 3, 4)])
def test_gru_cell_gradcheck(k, b, h):
    """Finite differences in float64 against the custom backward, every input at once."""
    gen = torch.Generator().manual_seed(11)
    gi, state = _randn(k, b, 3 * h, gen=gen), _randn(k, b, h, gen=gen)
    w_hh, b_hh = _randn(k, 3 * h, h, gen=gen), _randn(k, 3 * h, gen=gen)
    assert torch.autograd.gradcheck(
        _GRUCell.apply, (gi, state, w_hh, b_hh), eps=1e-6, atol=1e-7, rtol=1e-5
    )


def test_gru_cell_gradcheck_saturated_gates():
    """Large pre-activations (gates near 0/1, tanh near +-1): the regime of trained GRUs."""
    gen = torch.Generator().manual_seed(12)
    k, b, h = 2, 2, 3
    gi = (4.0 * torch.randn(k, b, 3 * h, generator=gen, dtype=torch.float64)).requires_grad_(True)
    state = _randn(k, b, h, gen=gen)
    w_hh = (2.0 * torch.randn(k, 3 * h, h, generator=gen, dtype=torch.float64)).requires_grad_(True)
    b_hh = _randn(k, 3 * h, gen=gen)
    assert torch.autograd.gradcheck(
        _GRUCell.apply, (gi, state, w_hh, b_hh), eps=1e-6, atol=1e-7, rtol=1e-5
    )


def test_group_gru_sequence_gradcheck():
    """Two layers over three steps: inputs, initial state and every weight (float64)."""
    gen = torch.Generator().manual_seed(13)
    k, b, t, f, h, layers = 2, 2, 3, 2, 3, 2
    gru = GroupGRU(k, f, h, num_layers=layers).double()
    names = [n for n, _ in gru.named_parameters()]
    x, h0 = _randn(k, b, t, f, gen=gen), _randn(layers, k, b, h, gen=gen)
    params = [p.detach().clone().requires_grad_(True) for p in gru.parameters()]

    def run(x, h0, *weights):
        return torch.func.functional_call(gru, dict(zip(names, weights)), (x, h0))

    assert torch.autograd.gradcheck(run, (x, h0, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_group_gru_gradients_equal_torch_gru(layers):
    """Same weights as K separate ``nn.GRU``: equal gradients of the inputs, the initial
    state and every weight and bias (float64, so the tolerance only covers rounding)."""
    torch.manual_seed(14)
    k, b, t, f, h = 3, 4, 5, 2, 6
    group = GroupGRU(k, f, h, num_layers=layers).double()
    x = torch.randn(k, b, t, f, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, k, b, h, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(layers, k, b, h, dtype=torch.float64)  # a loss that weighs every unit
    (group(x, h0) * w_out).sum().backward()
    for node in range(k):
        ref = nn.GRU(f, h, layers, batch_first=True).double()
        ref.load_state_dict({n: p[node] for n, p in group.state_dict().items()})
        x_ref = x.detach()[node].clone().requires_grad_(True)  # [B, T, F]
        h0_ref = h0.detach()[:, node].clone().requires_grad_(True)  # [L, B, H]
        _, h_n = ref(x_ref, h0_ref)
        (h_n * w_out[:, node]).sum().backward()
        torch.testing.assert_close(x.grad[node], x_ref.grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(h0.grad[:, node], h0_ref.grad, atol=1e-12, rtol=1e-10)
        for name, p in ref.named_parameters():
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(
                getattr(group, name).grad[node],
                p.grad,
                atol=1e-12,
                rtol=1e-10,
                msg=lambda m, name=name: f"{name}: {m}",
            )


@pytest.mark.parametrize("graph_embedding,layers", [(True, 1), (True, 2), (False, 2)])
def test_seq2seq_gradients_equal_torch_gru(graph_embedding, layers):
    """The whole node model (encoder, decoder with scheduled sampling, readout) against the
    nn.GRU reference: gradients of every parameter, the inputs and ``h_G``."""
    torch.manual_seed(15)
    k, hidden = 2, 5
    model = NodeSeq2Seq(
        k, hidden_size=hidden, num_layers=layers, graph_embedding=graph_embedding
    ).double()
    x, y_tod, targets, h_g, teacher = (
        v.double() if v.is_floating_point() else v for v in make_data(3, k, hidden, layers, seed=16)
    )
    teacher[0], teacher[1] = True, False
    x.requires_grad_(True)
    h_g = h_g.requires_grad_(True) if graph_embedding else None
    pred = model(x, y_tod, h_g, targets=targets, teacher=teacher)[..., 0]  # [B, H, K]
    (pred - targets).square().sum().backward()
    for node in range(k):
        ref = RefSeq2Seq(hidden, layers, graph_embedding).double()
        ref.load_state_dict(model.node_state(node))  # float64 weights, no rounding
        x_ref = x.detach()[:, :, node].clone().requires_grad_(True)
        hg_ref = h_g.detach()[:, node].clone().requires_grad_(True) if graph_embedding else None
        out = ref(x_ref, y_tod[:, :, node], hg_ref, targets[:, :, node], teacher[:, node])
        assert out.shape == (3, HORIZON, 1)
        (out[..., 0] - targets[:, :, node]).square().sum().backward()
        torch.testing.assert_close(x.grad[:, :, node], x_ref.grad, atol=1e-11, rtol=1e-9)
        if graph_embedding:
            torch.testing.assert_close(h_g.grad[:, node], hg_ref.grad, atol=1e-11, rtol=1e-9)
        params = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(
                params[name].grad[node],
                p.grad,
                atol=1e-11,
                rtol=1e-9,
                msg=lambda m, name=name: f"{name}: {m}",
            )


def _sequence_grads(gru: GroupGRU, x: torch.Tensor, h0: torch.Tensor) -> list[torch.Tensor]:
    """Weight gradients of one fresh forward and backward pass."""
    gru.zero_grad(set_to_none=True)
    gru(x, h0).square().sum().backward()
    return [p.grad.clone() for p in gru.parameters()]


def test_sequence_weight_sums_survive_other_backward_passes():
    """The recurrent weights' gradients are summed in place over a sequence's steps
    (``_HiddenWeightGrads``): a pass for an input alone (``autograd.grad``, which never
    reaches the weights) leaves partial sums that the next pass must not add; a second
    backward over a retained graph adds the same gradients again, exactly."""
    torch.manual_seed(17)
    gru = GroupGRU(2, 2, 4, num_layers=2).double()
    x = torch.randn(2, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    want = _sequence_grads(gru, x, h0)
    gru.zero_grad(set_to_none=True)
    out = gru(x, h0).square().sum()
    (dx,) = torch.autograd.grad(out, x, retain_graph=True)  # cells run, weights not reached
    assert dx.abs().max() > 0
    assert all(p.grad is None for p in gru.parameters())
    out.backward(retain_graph=True)
    for got, ref in zip([p.grad.clone() for p in gru.parameters()], want, strict=True):
        torch.testing.assert_close(got, ref, atol=0.0, rtol=0.0)
    out.backward()  # the same graph again: autograd adds to .grad, the sums start over
    for p, ref in zip(gru.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, 2 * ref, atol=1e-14, rtol=1e-12)


def test_frozen_weights_take_no_gradient_and_need_no_anchor():
    """Weights that take no gradient (the split step's views) run the plain cells: inputs
    still get their gradient, the weights none."""
    torch.manual_seed(18)
    gru = GroupGRU(2, 2, 4).double().requires_grad_(False)
    assert all(r.anchor is None for r in gru.recurrent())
    x = torch.randn(2, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    gru(x).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    assert all(p.grad is None for p in gru.parameters())
    with torch.no_grad():
        assert all(r.anchor is None for r in GroupGRU(2, 2, 4).recurrent())
