"""Server-side Graph Network of CNFGNN: Battaglia-style GN blocks batched over windows.

Node features are node-major ``[N, M, F]`` (``M = B * L`` windows times GRU layers) with
ONE shared ``edge_index`` for the fixed sensor graph: edges gather whole ``[M, F]`` slabs
with ``index_select`` along dim 0 and messages are summed at their targets with
``index_add`` along dim 0, so no batched (disjoint-union) index tensors are ever built
(docs/method.md §3.2) and every gather or scatter moves contiguous memory. Edge features
of the dense skip connections are kept as a list of parts (the first edge Linear is applied
part by part), so the ``[E, M, *]`` concatenations are never materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Sequential):
    r"""``Linear -> ReLU -> Dropout -> Linear -> ReLU -> Dropout -> Linear``.

    Args:
        in_size (int): input features.
        hidden_size (int): width of both hidden layers.
        out_size (int): output features (no activation on the output).
        dropout (float, optional): dropout after each hidden ReLU. (default: ``0.0``)

    Shapes:
        - **input:** ``[*, in_size]``; **output:** ``[*, out_size]``
    """

    def __init__(self, in_size: int, hidden_size: int, out_size: int, dropout: float = 0.0):
        super().__init__(
            nn.Linear(in_size, hidden_size),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, out_size),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, h: Tensor) -> Tensor:
        return self._layers(h, list(self))

    def tail(self, h: Tensor, last: bool = True) -> Tensor:
        """Everything after the first Linear, for callers that compute that layer themselves;
        ``last=False`` stops before the output Linear (the caller applies it, see
        :meth:`GNBlock.forward`)."""
        return self._layers(h, list(self)[1 : None if last else -1])

    @staticmethod
    def _layers(h: Tensor, layers: list[nn.Module]) -> Tensor:
        """``layers`` on ``h`` ``[*, f]``, every Linear on the rows as one 2-D matrix: its
        output is then a fresh tensor, not a view, and the in-place ReLUs after it need no
        copies in the backward pass (on a 3-D input ``F.linear`` returns a view)."""
        lead = h.shape[:-1]
        for m in layers:
            h = m(h.reshape(-1, h.shape[-1])) if isinstance(m, nn.Linear) else m(h)
        return h.view(*lead, h.shape[-1])


class GNBlock(nn.Module):
    r"""One Graph Network block (`Battaglia et al., 2018 <https://arxiv.org/abs/1806.01261>`_)
    in PyG ``MetaLayer`` order, with sum aggregation:

    .. math::
        e'_{ij} &= \phi_e([x_i, x_j, e_{ij}, u]) \quad (i \to j) \\
        x'_j &= \phi_v([x_j, \textstyle\sum_{i \to j} e'_{ij}, u]) \\
        u' &= \phi_u([\textstyle\sum_j x'_j, \sum_{ij} e'_{ij}, u])

    The first Linear of :math:`\phi_e` is applied to its concatenated input by parts, which
    is the same map: the node parts are projected once per node and then gathered per edge,
    so the wide ``[x_i, x_j]`` rows are never materialised for every edge.

    Args:
        node_in (int): node feature size.
        edge_in (int): edge feature size.
        global_in (int): global feature size.
        mlp_hidden (int): hidden width of the three MLPs.
        latent_size (int): output size of the three MLPs.
        dropout (float, optional): MLP dropout. (default: ``0.0``)

    Shapes:
        - **input:** x ``[N, M, node_in]``, e: one tensor or a list of parts, each
          ``[E, M or 1, f_i]`` with ``sum(f_i) = edge_in`` (their concatenation along the
          last dim is the edge input), u ``[M, global_in]``, src / dst ``[E]``
        - **output:** x' ``[N, M, latent]``, e' ``[E, M, latent]``, u' ``[M, latent]``;
          with ``update_global=False`` (the last block) e' and u' are ``None``: nothing
          reads them, and the edge MLP's output Linear is then applied to the per-node
          sums of its hidden layer (the same map, ``latent / hidden`` of its cost per edge)
    """

    def __init__(
        self,
        node_in: int,
        edge_in: int,
        global_in: int,
        mlp_hidden: int,
        latent_size: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.sizes = (node_in, node_in, edge_in, global_in)
        self.edge_mlp = MLP(2 * node_in + edge_in + global_in, mlp_hidden, latent_size, dropout)
        self.node_mlp = MLP(node_in + latent_size + global_in, mlp_hidden, latent_size, dropout)
        self.global_mlp = MLP(2 * latent_size + global_in, mlp_hidden, latent_size, dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for mlp in (self.edge_mlp, self.node_mlp, self.global_mlp):
            mlp.reset_parameters()

    def forward(
        self,
        x: Tensor,
        e: Tensor | list[Tensor],
        u: Tensor,
        src: Tensor,
        dst: Tensor,
        update_global: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        n, m, _ = x.shape
        parts = [e] if isinstance(e, Tensor) else list(e)
        if sum(p.shape[-1] for p in parts) != self.sizes[2]:
            raise ValueError(
                f"edge features have {sum(p.shape[-1] for p in parts)} columns, "
                f"this block takes {self.sizes[2]}"
            )
        first = self.edge_mlp[0]
        assert isinstance(first, nn.Linear)
        w_src, w_dst, w_e, w_u = first.weight.split(self.sizes, dim=1)
        pre = F.linear(x, w_src).index_select(0, src)  # [E, M, hidden]
        pre.add_(F.linear(x, w_dst).index_select(0, dst))  # index_select keeps no output
        off = 0
        for part in parts:  # [E, M or 1, f]: the edge columns of the first Linear, by parts
            pre.add_(F.linear(part, w_e[:, off : off + part.shape[-1]]))
            off += part.shape[-1]
        pre.add_(F.linear(u, w_u, first.bias))  # [M, hidden] broadcast over edges
        if update_global:
            e_new = self.edge_mlp.tail(pre)  # [E, M, latent]
            agg = e_new.new_zeros(n, m, e_new.shape[-1]).index_add(0, dst, e_new)
        else:  # the last block: e' is only summed at the targets, and the output Linear
            # commutes with that sum: W sum_i a_i + deg_j b, per node instead of per edge
            out = self.edge_mlp[-1]
            assert isinstance(out, nn.Linear)
            hid = self.edge_mlp.tail(pre, last=False)  # [E, M, hidden]
            hid_sum = hid.new_zeros(n, m, hid.shape[-1]).index_add(0, dst, hid)
            deg = torch.bincount(dst, minlength=n).to(hid.dtype)  # [N] in-degree
            agg = torch.addcmul(F.linear(hid_sum, out.weight), deg[:, None, None], out.bias)
            e_new = None
        x_new = self.node_mlp(torch.cat([x, agg, u.unsqueeze(0).expand(n, m, -1)], dim=-1))

        u_new = None
        if update_global:
            assert e_new is not None
            u_new = self.global_mlp(torch.cat([x_new.sum(0), e_new.sum(0), u], dim=-1))
        return x_new, e_new, u_new


class GraphNetwork(nn.Module):
    r"""CNFGNN's server-side Graph Network
    (`Meng et al., KDD 2021 <https://arxiv.org/abs/2106.05223>`_, §3.2 of the notes): maps the
    temporal encodings :math:`h_c` of all nodes to graph embeddings :math:`h_G`.

    ``num_blocks`` :class:`GNBlock` s with dense skip connections on all three streams, then a
    per-node output Linear:

    .. math::
        u^{(0)} = 0,\quad (x', e', u') = \mathrm{GN}_b(x, e, u),\quad
        x \leftarrow [x', x],\ e \leftarrow [e', e],\ u \leftarrow [u', u],\quad
        h_G = W_o x + b_o

    The global MLP of the LAST block is kept (so the parameter count is the authors'
    1,237,312 at the defaults) but never evaluated: its output would not be read. It receives
    no gradient. The block-1 first-layer weights that multiply :math:`u^{(0)} = 0` always get a
    zero gradient.

    Args:
        node_size (int, optional): input node features, the encoder's H. (default: ``64``)
        edge_size (int, optional): edge features. (default: ``1``)
        global_size (int, optional): initial global features (zeros). (default: ``64``)
        mlp_hidden (int, optional): MLP hidden width. (default: ``256``)
        latent_size (int, optional): edge / node / global update size. (default: ``128``)
        num_blocks (int, optional): GN blocks. (default: ``2``)
        output_size (int, optional): h_G size per node and layer. (default: ``64``)
        dropout (float, optional): MLP dropout. (default: ``0.0``)
        window_chunk (int, optional): windows per pass; a larger batch is run in runs of
            this many windows (independent graphs, so the same values; the per-edge
            ``[E, M, *]`` tensors stay cache-sized, which on a CPU is faster). ``None``: the
            whole batch in one pass. (default: ``None``)

    Shapes:
        - **input:** h ``[B, N, L, node_size]``, edge_index ``[2, E]`` (source -> target),
          edge_weight ``[E]`` or ``[E, edge_size]``
        - **output:** h_G ``[B, N, L, output_size]``
    """

    def __init__(
        self,
        node_size: int = 64,
        edge_size: int = 1,
        global_size: int = 64,
        mlp_hidden: int = 256,
        latent_size: int = 128,
        num_blocks: int = 2,
        output_size: int = 64,
        dropout: float = 0.0,
        window_chunk: int | None = None,
    ):
        super().__init__()
        if window_chunk is not None and window_chunk < 1:
            raise ValueError(
                f"window_chunk must be a positive number of windows or None, got {window_chunk}"
            )
        self.window_chunk = window_chunk
        self.node_size, self.edge_size, self.global_size = node_size, edge_size, global_size
        self.latent_size, self.num_blocks, self.output_size = latent_size, num_blocks, output_size
        blocks = []
        nx, ne, nu = node_size, edge_size, global_size
        for _ in range(num_blocks):
            blocks.append(GNBlock(nx, ne, nu, mlp_hidden, latent_size, dropout))
            nx, ne, nu = nx + latent_size, ne + latent_size, nu + latent_size
        self.blocks = nn.ModuleList(blocks)
        self.output = nn.Linear(nx, output_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for block in self.blocks:
            assert isinstance(block, GNBlock)
            block.reset_parameters()
        self.output.reset_parameters()

    def forward(self, h: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        c = self.window_chunk
        if c is not None and h.shape[0] > c:
            return torch.cat(
                [
                    self._forward(h[i : i + c], edge_index, edge_weight)
                    for i in range(0, h.shape[0], c)
                ]
            )
        return self._forward(h, edge_index, edge_weight)

    def _forward(self, h: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        """One pass over all of ``h``'s windows: ``[B, N, L, F]`` -> ``[B, N, L, out]``."""
        b, n, layers, _ = h.shape
        x = h.permute(1, 0, 2, 3).reshape(n, b * layers, -1)  # [B, N, L, F] -> [N, B*L, F]
        m = x.shape[1]
        src, dst = edge_index[0], edge_index[1]
        e: list[Tensor] = [edge_weight.to(x.dtype).reshape(edge_index.shape[1], 1, -1)]  # [E, 1, f]
        u = x.new_zeros(m, self.global_size)
        for i, block in enumerate(self.blocks):
            last = i + 1 == self.num_blocks
            x_new, e_new, u_new = block(x, e, u, src, dst, update_global=not last)
            x = torch.cat([x_new, x], dim=-1)
            if not last:
                assert e_new is not None and u_new is not None
                e = [e_new, *e]  # dense skip [e', e] without concatenating
                u = torch.cat([u_new, u], dim=-1)
        out = self.output(x)  # [N, B*L, out]
        return out.view(n, b, layers, -1).permute(1, 0, 2, 3)  # [B, N, L, out]
