"""Server-side work of CNFGNN: FedAvg and the graph network's split learning.

Plain PyTorch, no Flower import. The server holds the graph (adjacency) and the GN; it
receives only node-model weights, temporal encodings ``h_c``, gradients ``dL/dh_G`` and
sums/counts (docs/design.md §5). It never sees a series or a target.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn.models.graph_network import GraphNetwork
from cnfgnn.optim import make_adam


def fedavg(
    stacks: list[dict[str, np.ndarray]], examples: list[np.ndarray], weighting: str = "samples"
) -> dict[str, np.ndarray]:
    """Average per-node weights from several clients.

    Args:
        stacks: one dict per client, ``name -> [K_c, ...]`` (each node's weights).
        examples: one ``[K_c]`` array per client: windows each node trained on.
        weighting: ``samples`` (weighted by ``examples``) or ``uniform``.

    Returns:
        ``name -> [...]`` float32 global weights.
    """
    w = np.concatenate([np.asarray(e, np.float64) for e in examples])  # [N_answered]
    if weighting == "uniform":
        w = np.ones_like(w)
    elif weighting != "samples":
        raise ValueError(f"fedavg_weighting must be 'samples' or 'uniform', got {weighting!r}")
    if w.sum() <= 0:
        raise ValueError("FedAvg over zero examples")
    w = w / w.sum()
    ends = np.cumsum([len(e) for e in examples])
    out = {}
    for name in stacks[0]:  # client by client: float64 copies of one client's rows at a time
        acc = np.zeros(np.shape(stacks[0][name])[1:], np.float64)
        for s, hi, e in zip(stacks, ends, examples):
            acc += np.tensordot(w[hi - len(e) : hi], np.asarray(s[name], np.float64), axes=1)
        out[name] = acc.astype(np.float32)
    return out


class GraphServer:
    """The server GN with its persistent optimizer, on a fixed graph.

    ``model.gn.grad_chunk`` (windows, null = off) bounds the memory of a split-learning step:
    :meth:`forward` then computes ``h_G`` without a graph, and :meth:`step` recomputes the
    GN chunk by chunk and accumulates the exact full-batch gradient (one extra forward). It
    is what lets the GN train at thousands of nodes (``cnfgnn-bench bench.mode=scale``).

    Args:
        model_cfg: ``model`` config (``hidden_size``, ``gn``...).
        lr: Adam learning rate for the GN.
        device: torch device.
    """

    def __init__(self, model_cfg: Any, lr: float, device: torch.device | str = "cpu"):
        gn = model_cfg.gn
        chunk = gn.get("grad_chunk")
        self.grad_chunk = None if chunk is None else int(chunk)
        if self.grad_chunk is not None and (self.grad_chunk < 1 or float(gn.dropout) > 0):
            raise ValueError(
                f"model.gn.grad_chunk={chunk} needs a positive chunk and "
                f"model.gn.dropout=0 (got {gn.dropout}): a recomputed forward "
                "must equal the first. Fix: set grad_chunk=null or dropout=0"
            )
        self._pending: tuple[Tensor, tuple[Tensor, Tensor], Tensor] | None = None
        self.device = torch.device(device)
        self.gn = GraphNetwork(
            node_size=model_cfg.hidden_size,
            edge_size=1,
            global_size=model_cfg.hidden_size,
            mlp_hidden=gn.mlp_hidden,
            latent_size=gn.latent_size,
            num_blocks=gn.num_blocks,
            output_size=model_cfg.hidden_size,
            dropout=gn.dropout,
            window_chunk=gn.get("window_chunk"),
        ).to(self.device)
        self.optimizer = make_adam(self.gn.parameters(), lr=lr)
        self.output_size = int(model_cfg.hidden_size)

    def graph(self, adjacency: np.ndarray) -> tuple[Tensor, Tensor]:
        """``(edge_index [2, E], edge_weight [E])`` on the device for ``adj[i, j] > 0``."""
        src, dst = np.nonzero(adjacency)
        ei = torch.as_tensor(np.stack([src, dst]), dtype=torch.long, device=self.device)
        ew = torch.as_tensor(adjacency[src, dst], dtype=torch.float32, device=self.device)
        return ei, ew

    def forward(self, h_c: np.ndarray | Tensor, graph: tuple[Tensor, Tensor]) -> Tensor:
        """``h_G`` with autograd for a batch: h_c ``[B, N, L, H]`` -> ``[B, N, L, H]``.

        With ``grad_chunk`` set and a batch larger than it (and ``h_c`` not itself needing a
        gradient), ``h_G`` comes without a graph; :meth:`step` recomputes it in chunks.
        """
        self.gn.train()
        x = torch.as_tensor(h_c, device=self.device)
        c = self.grad_chunk
        self._pending = None
        if c is None or x.shape[0] <= c or x.requires_grad:
            return self.gn(x, *graph)
        with torch.no_grad():
            h_g = torch.cat([self.gn(x[i : i + c], *graph) for i in range(0, x.shape[0], c)])
        self._pending = (x, graph, h_g)
        return h_g

    def step(self, h_g: Tensor, grad: np.ndarray) -> None:
        """Backpropagate the assembled ``dL/dh_G`` through the GN and take one Adam step."""
        self.optimizer.zero_grad(set_to_none=True)
        g = torch.as_tensor(grad, dtype=h_g.dtype, device=self.device)
        pending, self._pending = self._pending, None
        if pending is not None and pending[2] is h_g:  # chunked: recompute, accumulate
            x, graph, _ = pending
            c = int(self.grad_chunk)  # type: ignore[arg-type]
            for i in range(0, x.shape[0], c):
                self.gn(x[i : i + c], *graph).backward(g[i : i + c])
        else:
            h_g.backward(g)
        self.optimizer.step()

    def step_through(
        self, h_c: Tensor, h_g: Tensor, grad_sum: np.ndarray, answered: int
    ) -> np.ndarray:
        """Split learning without alternation: one GN step and the gradient for the nodes.

        Args:
            h_c: ``[B, N, L, H]`` leaf that ``h_g`` was computed from (``requires_grad``).
            h_g: ``[B, N, L, H]`` output of :meth:`forward` on ``h_c``.
            grad_sum: ``[B, N, L, H]`` d(sum of node losses)/dh_G as the nodes returned it.
            answered: nodes that answered; the GN steps on the node mean.

        Returns:
            ``[B, N, L, H]`` d(sum of node losses)/dh_c through the GN, for the node encoders.
        """
        self.optimizer.zero_grad(set_to_none=True)
        h_g.backward(torch.as_tensor(grad_sum, dtype=h_g.dtype, device=self.device))
        for p in self.gn.parameters():
            if p.grad is not None:
                p.grad /= answered
        self.optimizer.step()
        assert h_c.grad is not None  # h_c requires grad (server_forward)
        return h_c.grad.cpu().numpy()

    @torch.no_grad()
    def embed_all(
        self, h_c: np.ndarray, graph: tuple[Tensor, Tensor], batch_size: int
    ) -> np.ndarray:
        """``h_G`` for every window, no gradient: ``[S, N, L, H]`` -> ``[S, N, L, H]``."""
        self.gn.eval()
        out = np.empty(h_c.shape[:-1] + (self.output_size,), dtype=np.float32)
        for b in range(0, h_c.shape[0], batch_size):
            chunk = torch.as_tensor(h_c[b : b + batch_size], device=self.device)
            out[b : b + batch_size] = self.gn(chunk, *graph).cpu().numpy()
        return out

    def num_parameters(self) -> int:
        """Trainable GN parameters (1,237,312 at the paper's sizes)."""
        return sum(p.numel() for p in self.gn.parameters())

    def state_dict(self) -> dict[str, Any]:
        """The GN's weights and optimizer state, copied by value: a snapshot that later
        steps do not change (``nn.Module.state_dict`` alone returns views of the live
        tensors, so a kept "best" state would follow the training)."""
        return copy.deepcopy({"gn": self.gn.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gn.load_state_dict(state["gn"])
        self.optimizer.load_state_dict(state["optimizer"])
