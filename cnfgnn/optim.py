"""Optimizers shared by the node workers, the server GN and the central limit."""

from __future__ import annotations

from typing import Any

import torch


def prepare() -> None:
    """Import what ``torch.optim`` imports when a process makes its first optimizer.

    That is ``torch._dynamo``: about 1-2 s on a 2-core machine, paid once per process.
    Called where it would otherwise land inside round 1: before the in-process
    engine forks its client processes (the children inherit the import) and when a Flower
    ClientApp prepares at identification.
    """
    import torch._dynamo  # noqa: F401


def make_adam(params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with the fused kernel where PyTorch has one (CPU and CUDA float tensors).

    Same update as the default implementation up to float rounding, in one pass per tensor
    instead of about ten elementwise ops: on a busy 2-core CPU the GN's Adam step went from
    0.59 s to 0.11 s (2 threads) and from 0.07 s to 0.03 s (1 thread).
    """
    params = list(params)
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
