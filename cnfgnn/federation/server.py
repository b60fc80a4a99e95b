"""Server-side work of CNFGNN: FedAvg and the graph network's split learning.

Plain PyTorch, no Flower import. The server holds the graph (adjacency) and the GN; it
receives only node-model weights, temporal encodings ``h_c``, gradients ``dL/dh_G`` and
sums/counts (DESIGN.md §5). It never sees a series or a target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn.models.graph_network import GraphNetwork


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
    out = {}
    for name in stacks[0]:
        stacked = np.concatenate([s[name] for s in stacks]).astype(np.float64)  # [N, ...]
        out[name] = np.tensordot(w, stacked, axes=1).astype(np.float32)
    return out


class GraphServer:
    """The server GN with its persistent optimizer, on a fixed graph.

    Args:
        model_cfg: ``model`` config (``hidden_size``, ``gn``...).
        lr: Adam learning rate for the GN.
        device: torch device.
    """

    def __init__(self, model_cfg: Any, lr: float, device: torch.device | str = "cpu"):
        gn = model_cfg.gn
        self.device = torch.device(device)
        self.gn = GraphNetwork(
            node_size=model_cfg.hidden_size, edge_size=1, global_size=model_cfg.hidden_size,
            mlp_hidden=gn.mlp_hidden, latent_size=gn.latent_size, num_blocks=gn.num_blocks,
            output_size=model_cfg.hidden_size, dropout=gn.dropout,
        ).to(self.device)
        self.optimizer = torch.optim.Adam(self.gn.parameters(), lr=lr)
        self.output_size = int(model_cfg.hidden_size)

    def graph(self, adjacency: np.ndarray) -> tuple[Tensor, Tensor]:
        """``(edge_index [2, E], edge_weight [E])`` on the device for ``adj[i, j] > 0``."""
        src, dst = np.nonzero(adjacency)
        ei = torch.as_tensor(np.stack([src, dst]), dtype=torch.long, device=self.device)
        ew = torch.as_tensor(adjacency[src, dst], dtype=torch.float32, device=self.device)
        return ei, ew

    def forward(self, h_c: np.ndarray, graph: tuple[Tensor, Tensor]) -> Tensor:
        """``h_G`` with autograd for a batch: h_c ``[B, N, L, H]`` -> ``[B, N, L, H]``."""
        self.gn.train()
        return self.gn(torch.as_tensor(h_c, device=self.device), *graph)

    def step(self, h_g: Tensor, grad: np.ndarray) -> None:
        """Backpropagate the assembled ``dL/dh_G`` through the GN and take one Adam step."""
        self.optimizer.zero_grad(set_to_none=True)
        h_g.backward(torch.as_tensor(grad, dtype=h_g.dtype, device=self.device))
        self.optimizer.step()

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

    def state_dict(self) -> dict[str, Any]:
        return {"gn": self.gn.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gn.load_state_dict(state["gn"])
        self.optimizer.load_state_dict(state["optimizer"])
