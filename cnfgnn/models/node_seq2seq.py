"""Per-node GRU encoder-decoder, computed for a group of nodes with stacked weights.

Every node keeps its own weights, stacked along a leading ``K`` dimension, and the group is
evaluated with batched matmuls (``torch.baddbmm``). Adam and the other elementwise
optimizers then keep separate per-node state for free, so training node ``k`` inside a group
gives the same result as training it alone (docs/design.md §4; docs/method.md §3.1).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


def teacher_forcing_prob(step: int, k: float) -> float:
    r"""Scheduled-sampling probability of feeding the ground truth, :math:`k / (k + e^{s/k})`.

    Returns ``0.0`` once :math:`e^{s/k}` overflows a float (e.g. ``k = 1`` after ~710 steps).
    """
    try:
        return k / (k + math.exp(step / k))
    except OverflowError:
        return 0.0


class _HiddenWeightGrads:
    r"""The recurrent weights' gradients of one sequence, summed in place over its steps.

    Autograd would take one ``[K, 3H, H]`` gradient per step from :class:`_GRUCell` and add
    the steps' up in a buffer: per step, two fresh matmul outputs, their concatenation and
    an addition, all of the weight's size (for the decoder, as large as the step's own
    activations). Here each step's backward adds ``d^T h`` into one buffer in the matmul
    itself (``baddbmm_``), and :class:`_SequenceWeights` hands the sums to autograd once per
    sequence: the same sums, a third of the passes over the weight.

    A backward pass that does not reach the weights (``torch.autograd.grad`` for an input
    alone) leaves partial sums behind; they are tagged with the pass's graph task and
    dropped by the next pass.
    """

    __slots__ = ("task", "w_rz", "w_n", "b")

    def __init__(self) -> None:
        self.task: int | None = None
        self.w_rz: Tensor | None = None  # [K, 2H, H]
        self.w_n: Tensor | None = None  # [K, H, H]
        self.b: Tensor | None = None  # [K, 3H]

    def add(self, d_rz: Tensor, d_hn: Tensor, h: Tensor) -> None:
        """One step: gate gradients d_rz ``[K, B, 2H]``, d_hn ``[K, B, H]``, state h
        ``[K, B, H]``."""
        task = torch._C._current_graph_task_id()
        if self.task != task or self.w_rz is None or self.w_n is None or self.b is None:
            self.task = task
            self.w_rz = torch.bmm(d_rz.transpose(1, 2), h)
            self.w_n = torch.bmm(d_hn.transpose(1, 2), h)
            self.b = torch.cat([d_rz.sum(1), d_hn.sum(1)], 1)
            return
        self.w_rz.baddbmm_(d_rz.transpose(1, 2), h)
        self.w_n.baddbmm_(d_hn.transpose(1, 2), h)
        hs = h.shape[-1]
        self.b[:, : 2 * hs].add_(d_rz.sum(1))
        self.b[:, 2 * hs :].add_(d_hn.sum(1))

    def take(self) -> tuple[Tensor | None, Tensor | None]:
        """The sums of this backward pass (``None``, ``None`` if it added none) and reset."""
        fresh = self.task == torch._C._current_graph_task_id()
        w_rz, w_n, b = self.w_rz, self.w_n, self.b
        self.task = self.w_rz = self.w_n = self.b = None
        if not fresh or w_rz is None or w_n is None:
            return None, None
        return torch.cat([w_rz, w_n], 1), b


class _SequenceWeights(torch.autograd.Function):
    r"""Where one sequence's recurrent weights enter the graph (see :class:`_HiddenWeightGrads`).

    Returns an empty *anchor* that every :class:`_GRUCell` of the sequence takes as an
    input; the cells add their weight gradients to ``grads`` and return an empty gradient
    for the anchor. Autograd runs this node's backward after all of them, and it returns the
    sums as the weights' gradients.

    Shapes: w_hh ``[K, 3H, H]``, b_hh ``[K, 3H]`` -> anchor ``[0]``.
    """

    @staticmethod
    def forward(ctx: Any, w_hh: Tensor, b_hh: Tensor, grads: _HiddenWeightGrads) -> Tensor:
        ctx.grads = grads
        return w_hh.new_empty(0)

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        dw, db = ctx.grads.take()
        return (
            dw if ctx.needs_input_grad[0] else None,
            db if ctx.needs_input_grad[1] else None,
            None,
        )


class Recurrent(NamedTuple):
    """One layer's recurrent weights as the cells of a sequence take them
    (:meth:`GroupGRU.recurrent`): w_hh ``[K, 3H, H]``, b_hh ``[K, 3H]``, and the anchor and
    sums of :class:`_SequenceWeights` (both ``None`` when the weights take no gradient)."""

    w_hh: Tensor
    b_hh: Tensor
    anchor: Tensor | None
    grads: _HiddenWeightGrads | None


class _GRUCell(torch.autograd.Function):
    r"""The GRU update of :class:`GroupGRU` with a hand-written backward.

    Same values as the plain autograd graph (``r, z = sigmoid(.)``, ``n = tanh(.)``,
    ``h' = n + z (h - n)``) with fewer, in-place elementwise passes over the ``[K, B, H]``
    tensors and a third of the saved activations; the gate gradients are written into one
    ``[K, B, 3H]`` buffer instead of being concatenated. Training a GRU on CPU is bound by
    these passes, not by the matmuls. ``gradcheck`` and the ``nn.GRU`` equivalence tests
    cover it.

    With an ``anchor`` of :class:`_SequenceWeights` (and its ``grads``), the weight
    gradients go to ``grads`` instead (pass the weights detached); without, they are
    returned as usual.

    Shapes: gi ``[K, B, 3H]`` (input gates with bias), h ``[K, B, H]``, w_hh ``[K, 3H, H]``,
    b_hh ``[K, 3H]`` -> h' ``[K, B, H]``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        gi: Tensor,
        h: Tensor,
        w_hh: Tensor,
        b_hh: Tensor,
        anchor: Tensor | None = None,
        grads: _HiddenWeightGrads | None = None,
    ) -> Tensor:
        hs = h.shape[-1]
        w_rz, w_n = w_hh[:, : 2 * hs], w_hh[:, 2 * hs :]
        rz = torch.baddbmm(b_hh[:, None, : 2 * hs], h, w_rz.transpose(1, 2))  # [K, B, 2H]
        rz.add_(gi[..., : 2 * hs]).sigmoid_()
        h_n = torch.baddbmm(b_hh[:, None, 2 * hs :], h, w_n.transpose(1, 2))  # [K, B, H]
        r, z = rz[..., :hs], rz[..., hs:]
        n = torch.addcmul(gi[..., 2 * hs :], r, h_n).tanh_()
        ctx.save_for_backward(h, w_hh, rz, n, h_n)
        ctx.grads = grads
        return torch.lerp(n, h, z)  # n + z (h - n)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        h, w_hh, rz, n, h_n = ctx.saved_tensors
        hs = h.shape[-1]
        r, z = rz[..., :hs], rz[..., hs:]
        d = torch.empty(h.shape[:-1] + (3 * hs,), dtype=g.dtype, device=g.device)
        d_r, d_z, d_n = d[..., :hs], d[..., hs : 2 * hs], d[..., 2 * hs :]
        torch.mul(n, n, out=d_n).sub_(1.0).mul_(z - 1.0).mul_(g)  # g (1 - z)(1 - n^2)
        torch.sub(h, n, out=d_z).mul_(g).mul_(z).mul_(1.0 - z)  # g (h - n) z (1 - z)
        d_hn = d_n * r  # dL/d(W_hn h + b_hn)
        torch.mul(d_hn, h_n, out=d_r).mul_(1.0 - r)  # dn_pre h_n r (1 - r)
        d_rz = d[..., : 2 * hs]
        dh = torch.mul(g, z)
        dh.baddbmm_(d_rz, w_hh[:, : 2 * hs]).baddbmm_(d_hn, w_hh[:, 2 * hs :])
        dw = db = d_anchor = None  # weight gradients only when the weights take them
        needs = ctx.needs_input_grad
        if len(needs) > 4 and needs[4]:  # the sequence's weights: summed in place
            ctx.grads.add(d_rz, d_hn, h)
            d_anchor = g.new_empty(0)
        if needs[2] or needs[3]:  # weights passed as they are: this step is its own sequence
            own = _HiddenWeightGrads()
            own.add(d_rz, d_hn, h)
            dw, db = own.take()
            dw, db = (dw if needs[2] else None), (db if needs[3] else None)
        return d, dh, dw, db, d_anchor, None


class GroupGRU(nn.Module):
    r"""A multi-layer GRU with separate weights for each of ``K`` nodes, run in batched passes.

    Same equations and gate order (r, z, n) as :class:`torch.nn.GRU`
    (`Cho et al., 2014 <https://arxiv.org/abs/1406.1078>`_), for every node :math:`k`:

    .. math::
        r &= \sigma(W^k_{ir} x + b^k_{ir} + W^k_{hr} h + b^k_{hr}) \\
        z &= \sigma(W^k_{iz} x + b^k_{iz} + W^k_{hz} h + b^k_{hz}) \\
        n &= \tanh(W^k_{in} x + b^k_{in} + r \odot (W^k_{hn} h + b^k_{hn})) \\
        h' &= (1 - z) \odot n + z \odot h

    Parameters are named like :class:`torch.nn.GRU`'s but stacked: ``weight_ih_l{l}``
    ``[K, 3H, in_l]``, ``weight_hh_l{l}`` ``[K, 3H, H]``, ``bias_ih_l{l}`` and ``bias_hh_l{l}``
    ``[K, 3H]``, where ``in_0 = input_size`` and ``in_l = H`` for ``l > 0``.

    Args:
        num_nodes (int): number of nodes ``K`` in the group.
        input_size (int): input features per step.
        hidden_size (int): hidden size ``H``.
        num_layers (int, optional): stacked GRU layers ``L``. (default: ``1``)

    Shapes:
        - **step:** x ``[K, B, in]``, h ``[L, K, B, H]`` -> h' ``[L, K, B, H]``
        - **forward:** x ``[K, B, T, in]``, h0 ``[L, K, B, H]`` or ``None`` (zeros)
          -> h_n ``[L, K, B, H]``
    """

    def __init__(self, num_nodes: int, input_size: int, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.num_nodes, self.input_size = num_nodes, input_size
        self.hidden_size, self.num_layers = hidden_size, num_layers
        g = 3 * hidden_size
        for layer in range(num_layers):
            in_l = input_size if layer == 0 else hidden_size
            self.register_parameter(
                f"weight_ih_l{layer}", nn.Parameter(torch.empty(num_nodes, g, in_l))
            )
            self.register_parameter(
                f"weight_hh_l{layer}", nn.Parameter(torch.empty(num_nodes, g, hidden_size))
            )
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(num_nodes, g)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(num_nodes, g)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every weight and bias, like :class:`nn.GRU`."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _layer(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            getattr(self, f"weight_ih_l{layer}"),
            getattr(self, f"weight_hh_l{layer}"),
            getattr(self, f"bias_ih_l{layer}"),
            getattr(self, f"bias_hh_l{layer}"),
        )

    @staticmethod
    def _input_gates(x: Tensor, w_ih: Tensor, b_ih: Tensor) -> Tensor:
        """``[K, R, in]`` -> ``[K, R, 3H]``: W_ih x + b_ih for every row of every node."""
        return torch.baddbmm(b_ih.unsqueeze(1), x, w_ih.transpose(1, 2))

    def recurrent(self) -> list[Recurrent]:
        """Every layer's ``(w_hh, b_hh, anchor, grads)`` for the cells of ONE sequence.

        When the weights take gradients, they come detached with an anchor
        (:class:`_SequenceWeights`) whose backward hands autograd their gradients summed
        over the sequence's steps (:class:`_HiddenWeightGrads`); otherwise as they are,
        with no anchor. A caller that steps a sequence itself (:meth:`NodeSeq2Seq.decode`)
        gets these once and passes them to every :meth:`step_layers`.
        """
        out = []
        for layer in range(self.num_layers):
            _, w_hh, _, b_hh = self._layer(layer)
            if torch.is_grad_enabled() and (w_hh.requires_grad or b_hh.requires_grad):
                grads = _HiddenWeightGrads()
                anchor = _SequenceWeights.apply(w_hh, b_hh, grads)
                out.append(Recurrent(w_hh.detach(), b_hh.detach(), anchor, grads))
            else:
                out.append(Recurrent(w_hh, b_hh, None, None))
        return out

    @staticmethod
    def _cell(gi: Tensor, h: Tensor, rec: Recurrent) -> Tensor:
        """One GRU update from precomputed input gates ``gi`` ``[K, B, 3H]``, h ``[K, B, H]``."""
        return _GRUCell.apply(gi, h, rec.w_hh, rec.b_hh, rec.anchor, rec.grads)

    def step_layers(
        self, x: Tensor, h: list[Tensor], rec: list[Recurrent] | None = None
    ) -> list[Tensor]:
        """:meth:`step` on a list of per-layer states ``[K, B, H]`` (cheaper backward than
        selecting from a stacked tensor at every step); ``rec``: the sequence's
        :meth:`recurrent` weights (``None``: this step is a sequence of its own)."""
        rec = self.recurrent() if rec is None else rec
        out = []
        inp = x
        for layer in range(self.num_layers):
            w_ih, _, b_ih, _ = self._layer(layer)
            inp = self._cell(self._input_gates(inp, w_ih, b_ih), h[layer], rec[layer])
            out.append(inp)
        return out

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        """Advance every layer by one time step: x ``[K, B, in]``, h ``[L, K, B, H]``."""
        return torch.stack(self.step_layers(x, list(h.unbind(0))))

    def forward(self, x: Tensor, h0: Tensor | None = None) -> Tensor:
        """Run over the whole sequence x ``[K, B, T, in]``; return h_n ``[L, K, B, H]``."""
        k, b, t, _ = x.shape
        h0s = (
            [x.new_zeros(k, b, self.hidden_size)] * self.num_layers if h0 is None else h0.unbind(0)
        )
        seq = x.transpose(1, 2)  # [K, T, B, in]: time-major rows, so every step is one slab
        h_n = []
        recs = self.recurrent()
        for layer in range(self.num_layers):  # layer by layer: input gates of all steps at once
            w_ih, _, b_ih, _ = self._layer(layer)
            gi = self._input_gates(seq.reshape(k, t * b, -1), w_ih, b_ih)  # [K, T*B, 3H]
            h = h0s[layer]
            outs = []
            for gi_s in gi.view(k, t, b, -1).unbind(1):  # unbind: one stack in backward
                h = self._cell(gi_s, h, recs[layer])
                outs.append(h)
            h_n.append(h)
            if layer + 1 < self.num_layers:
                seq = torch.stack(outs, dim=1)  # [K, T, B, H]
        return torch.stack(h_n)

    def extra_repr(self) -> str:
        return (
            f"num_nodes={self.num_nodes}, input_size={self.input_size}, "
            f"hidden_size={self.hidden_size}, num_layers={self.num_layers}"
        )


class GroupLinear(nn.Module):
    r"""A linear layer with separate weights for each of ``K`` nodes: :math:`y_k = W_k x_k + b_k`.

    Args:
        num_nodes (int): number of nodes ``K``.
        in_features (int): input size.
        out_features (int): output size.

    Shapes:
        - **input:** ``[K, B, in_features]``
        - **output:** ``[K, B, out_features]``
    """

    def __init__(self, num_nodes: int, in_features: int, out_features: int):
        super().__init__()
        self.num_nodes, self.in_features, self.out_features = num_nodes, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_nodes, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_nodes, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per node, the default :class:`nn.Linear` init: kaiming_uniform(a=sqrt(5)) for the
        weight and the bias both reduce to U(-1/sqrt(in), 1/sqrt(in))."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"num_nodes={self.num_nodes}, in_features={self.in_features}, "
            f"out_features={self.out_features}"
        )


class NodeSeq2Seq(nn.Module):
    r"""CNFGNN's node-level GRU encoder-decoder for a group of ``K`` nodes, each with its own
    weights (`Meng et al., KDD 2021 <https://arxiv.org/abs/2106.05223>`_, §3.1 of the notes).

    Encoder: :math:`h_c = \mathrm{GRU}_{enc}(x_{1..T})`. Decoder: a GRU started from
    :math:`[h_c ; h_G]` (``graph_embedding=True``, hidden 2H) or :math:`h_c` (plain seq2seq of
    the baselines, hidden H), run autoregressively for ``horizon`` steps:

    .. math::
        s_0 = x_T,\quad h_t = \mathrm{GRU}_{dec}(s_t, h_{t-1}),\quad
        \hat y_t = W h_t^{(L)} + b,\quad s_{t+1} = [\hat y_t \text{ or } y_t,\ \mathrm{tod}_t]

    where the ground truth :math:`y_t` is fed instead of :math:`\hat y_t` wherever the
    caller's ``teacher`` mask is set (scheduled-sampling draws are the caller's business).

    Parameter names follow :class:`nn.GRU` / :class:`nn.Linear` (``encoder.weight_ih_l0``,
    ``decoder.bias_hh_l0``, ``readout.weight``...), each stacked along a leading ``K``.

    Args:
        num_nodes (int): nodes ``K`` in the group.
        input_size (int, optional): input features, the target plus time of day. (default: ``2``)
        output_size (int, optional): predicted features; must be ``input_size - 1``.
            (default: ``1``)
        hidden_size (int, optional): encoder hidden size ``H``. (default: ``64``)
        num_layers (int, optional): GRU layers ``L``. (default: ``1``)
        graph_embedding (bool, optional): decoder starts from ``[h_c ; h_G]``. (default: ``True``)
        horizon (int, optional): decoding steps. (default: ``12``)

    Shapes:
        - **x:** ``[B, T_in, K, F]``; **y_tod:** ``[B, horizon, K]``;
          **h_g:** ``[B, K, L, H]``; **targets:** ``[B, horizon, K]``;
          **teacher:** ``[horizon, K]`` bool
        - **encode:** -> h_c ``[B, K, L, H]``
        - **forward / decode:** -> predictions ``[B, horizon, K, output_size]``
    """

    def __init__(
        self,
        num_nodes: int,
        input_size: int = 2,
        output_size: int = 1,
        hidden_size: int = 64,
        num_layers: int = 1,
        graph_embedding: bool = True,
        horizon: int = 12,
    ):
        super().__init__()
        if input_size != output_size + 1:
            raise ValueError(
                "decoder inputs are [prediction, time of day]: "
                f"input_size ({input_size}) must be output_size ({output_size}) + 1"
            )
        self.num_nodes, self.input_size, self.output_size = num_nodes, input_size, output_size
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.graph_embedding, self.horizon = graph_embedding, horizon
        dec_hidden = 2 * hidden_size if graph_embedding else hidden_size
        self.encoder = GroupGRU(num_nodes, input_size, hidden_size, num_layers)
        self.decoder = GroupGRU(num_nodes, input_size, dec_hidden, num_layers)
        self.readout = GroupLinear(num_nodes, dec_hidden, output_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        self.decoder.reset_parameters()
        self.readout.reset_parameters()

    def encode(self, x: Tensor) -> Tensor:
        """x ``[B, T_in, K, F]`` (scaled speed, time of day) -> h_c ``[B, K, L, H]``."""
        h_n = self.encoder(x.permute(2, 0, 1, 3))  # [K, B, T, F] -> [L, K, B, H]
        return h_n.permute(2, 1, 0, 3)

    def decode(
        self,
        x_last: Tensor,
        y_tod: Tensor,
        h_c: Tensor,
        h_g: Tensor | None = None,
        targets: Tensor | None = None,
        teacher: Tensor | None = None,
    ) -> Tensor:
        """Autoregressive decoding from the last observed input ``x_last`` ``[B, K, F]``.

        ``teacher[t, k]`` feeds ``targets[:, t, k]`` instead of node k's prediction after
        step t. Returns predictions ``[B, horizon, K, output_size]``.
        """
        if self.graph_embedding:
            if h_g is None:
                raise ValueError("graph_embedding=True needs h_g")
            h_c = torch.cat([h_c, h_g], dim=-1)  # [B, K, L, 2H]
        elif h_g is not None:
            raise ValueError("graph_embedding=False takes no h_g")
        h = list(h_c.permute(2, 1, 0, 3).unbind(0))  # L x [K, B, Hd]
        inp = x_last.transpose(0, 1)  # [K, B, F]
        tod = y_tod.permute(1, 2, 0).unsqueeze(-1)  # [horizon, K, B, 1]
        if teacher is not None:
            if targets is None:
                raise ValueError("teacher forcing needs targets")
            truth = targets.permute(1, 2, 0).unsqueeze(-1)  # [horizon, K, B, 1]
            mask = teacher.to(torch.bool)[:, :, None, None]  # [horizon, K, 1, 1]
        preds = []
        rec = self.decoder.recurrent()  # one sequence: weight gradients summed in place
        for t in range(self.horizon):
            h = self.decoder.step_layers(inp, h, rec)
            y = self.readout(h[-1])  # [K, B, out]
            preds.append(y)
            if t + 1 < self.horizon:
                fed = torch.where(mask[t], truth[t], y) if teacher is not None else y
                inp = torch.cat([fed, tod[t]], dim=-1)
        return torch.stack(preds, dim=2).permute(
            1, 2, 0, 3
        )  # [K, B, horizon, out] -> [B, horizon, K, out]

    def forward(
        self,
        x: Tensor,
        y_tod: Tensor,
        h_g: Tensor | None = None,
        targets: Tensor | None = None,
        teacher: Tensor | None = None,
    ) -> Tensor:
        """Encode ``x`` ``[B, T_in, K, F]`` and decode ``horizon`` steps."""
        return self.decode(x[:, -1], y_tod, self.encode(x), h_g, targets, teacher)

    def node_groups(self, size: int | None, trainable: bool) -> list[tuple[slice, NodeSeq2Seq]]:
        """This group's nodes in runs of at most ``size`` (``None``: one run of all of them).

        Each run comes as a :class:`NodeSeq2Seq` whose parameters are views of this model's
        rows ``[k0:k1]``: the same storage (a step or a load here is seen there), their own
        ``.grad``; ``trainable=False`` views take no gradient (a backward pass for the
        inputs alone then skips the weight gradients). Nodes never interact, so running a
        big group run by run gives every node the same values and gradients while the
        per-step ``[K, B, 3H]`` tensors stay cache-sized (``node_chunk`` in ``conf/``).
        """
        k = self.num_nodes
        size = k if size is None else max(1, min(int(size), k))
        groups = []
        for k0 in range(0, k, size):
            rows = slice(k0, min(k0 + size, k))
            rows_of = {name: p.detach()[rows] for name, p in self.named_parameters()}
            groups.append((rows, self._with_parameters(rows_of, trainable)))
        return groups

    @classmethod
    def stacked(cls, nets: list[NodeSeq2Seq], trainable: bool) -> NodeSeq2Seq:
        """One model whose nodes are those of ``nets`` (the same architecture), in order:
        copies of their weights, in new storage."""
        first = nets[0]
        if any(n.architecture != first.architecture for n in nets):
            raise ValueError("node models of different architectures do not stack")
        rows = {
            name: torch.cat([n.get_parameter(name).detach() for n in nets])
            for name, _ in first.named_parameters()
        }
        return first._with_parameters(rows, trainable)

    @property
    def architecture(self) -> tuple[Any, ...]:
        """Everything but ``num_nodes`` that shapes a node's weights and passes."""
        return (
            self.input_size,
            self.output_size,
            self.hidden_size,
            self.num_layers,
            self.graph_embedding,
            self.horizon,
        )

    def _with_parameters(self, params: dict[str, Tensor], trainable: bool) -> NodeSeq2Seq:
        """A model of this architecture whose parameters are ``params`` (name ->
        ``[k, ...]``, used as they are: views stay views), in this model's train mode."""
        k = next(iter(params.values())).shape[0]
        with torch.device("meta"):  # no storage, no draw from the global generator
            out = NodeSeq2Seq(k, *self.architecture)
        for name, value in params.items():
            owner, _, attr = name.rpartition(".")
            setattr(out.get_submodule(owner), attr, nn.Parameter(value, requires_grad=trainable))
        return out.train(self.training)

    # ------------------------------------------------------------------ FedAvg helpers
    def node_state(self, k: int) -> dict[str, Tensor]:
        """Unstacked copy of node ``k``'s weights: name -> ``[...]``."""
        return {n: p[k].detach().clone() for n, p in self.named_parameters()}

    def stacked_state(self) -> dict[str, Tensor]:
        """All nodes' weights: name -> ``[K, ...]`` (detached clones)."""
        return {n: p.detach().clone() for n, p in self.named_parameters()}

    def _check_keys(self, state: dict[str, Tensor]) -> dict[str, nn.Parameter]:
        params = dict(self.named_parameters())
        if set(state) != set(params):
            raise KeyError(
                f"missing {sorted(set(params) - set(state))}, "
                f"unexpected {sorted(set(state) - set(params))}"
            )
        return params

    @torch.no_grad()
    def load_stacked_state(self, state: dict[str, Tensor]) -> None:
        """Load name -> ``[K, ...]`` weights, one row per node."""
        for n, p in self._check_keys(state).items():
            v = torch.as_tensor(state[n])
            if v.shape != p.shape:
                raise ValueError(f"{n}: expected {tuple(p.shape)}, got {tuple(v.shape)}")
            p.copy_(v)

    @torch.no_grad()
    def load_global_state(self, state: dict[str, Tensor]) -> None:
        """Load one node's name -> ``[...]`` weights into all ``K`` nodes."""
        for n, p in self._check_keys(state).items():
            v = torch.as_tensor(state[n])
            if v.shape != p.shape[1:]:
                raise ValueError(f"{n}: expected {tuple(p.shape[1:])}, got {tuple(v.shape)}")
            p.copy_(v.unsqueeze(0).expand_as(p))

    def num_parameters_per_node(self) -> int:
        """Trainable parameters of one node (63,873 for the CNFGNN default)."""
        return sum(p[0].numel() for p in self.parameters())


def build_node_model(model: Any, num_nodes: int = 1) -> NodeSeq2Seq:
    """The node model of a ``model`` config group (``conf/model/*.yaml``) for ``num_nodes``
    nodes: the one place that maps the config's keys to :class:`NodeSeq2Seq`'s arguments.
    Initialised from torch's global generator (callers seed it)."""
    return NodeSeq2Seq(
        num_nodes=num_nodes,
        input_size=int(model.input_size),
        output_size=int(model.output_size),
        hidden_size=int(model.hidden_size),
        num_layers=int(model.num_layers),
        graph_embedding=bool(model.graph_embedding),
        horizon=int(model.horizon),
    )
