"""Differential privacy for what a node uploads: clipping and Gaussian noise (issue 8).

Plain PyTorch and numpy, no Flower import. Three mechanisms, each a Gaussian mechanism on
a clipped quantity, configured in ``conf/privacy/`` (``privacy=dp``):

* ``h_c``: the temporal encoding of one window of one node, the ``[L, H]`` slice of an
  upload ``[S, K, L, H]``, clipped to L2 norm ``C`` and released with noise
  ``N(0, (sigma C)^2)`` on every element (node side, before sending).
* ``grad``: ``dL_k/dh_G`` of one window of one node (the ``[L, H]`` slice of
  ``[B, K, L, H]``), clipped and noised the same way (node side).
* ``fedavg``: each node's model update ``w_k - w_global`` clipped to norm ``C`` over all
  its parameters (node side), Gaussian noise of std ``sigma C / N`` added to the average
  of the N sampled nodes (server side): the semantics of Flower's
  ``DifferentialPrivacyClientSideFixedClipping`` (``flwr.supercore.differential_privacy``:
  ``compute_clip_model_update``, ``compute_stdv``; a test checks both agree).

Noise comes from one ``torch.Generator`` per node and release, seeded with
:func:`release_seeds` from (experiment seed, node, round, kind, counter) through
:mod:`cnfgnn.rng`: the draws do not depend on how nodes are grouped into clients, and no
two releases share a key. The accounting is in :mod:`cnfgnn.privacy.accounting`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn import rng

#: Release kinds (part of the noise key; never reuse a code).
KINDS = {"h_c": 1, "grad": 2, "fedavg": 3, "sl_h_c": 4, "sl_grad": 5}
_KIND_SHIFT = 48  # counter bits below the kind code


@dataclass(frozen=True)
class Mechanism:
    """One clipped Gaussian mechanism.

    Attributes:
        clip: L2 clip norm ``C`` (None: no clipping, so no noise either).
        noise_multiplier: ``sigma``; the noise std is ``sigma * C`` per released element
            (``sigma * C / N`` on a FedAvg mean of N nodes). 0 = clip only.
    """

    clip: float | None
    noise_multiplier: float = 0.0

    @property
    def active(self) -> bool:
        return self.clip is not None

    @property
    def private(self) -> bool:
        """True when a release has a finite privacy cost (clipped and noised)."""
        return self.clip is not None and self.noise_multiplier > 0


@dataclass(frozen=True)
class PrivacySettings:
    """The ``privacy`` config group, checked.

    Attributes:
        h_c, grad, fedavg: the three mechanisms.
        delta: the delta at which epsilon is reported.
    """

    h_c: Mechanism
    grad: Mechanism
    fedavg: Mechanism
    delta: float

    @classmethod
    def from_cfg(cls, cfg: Any) -> PrivacySettings | None:
        """Settings from a composed config; None when ``privacy.enabled`` is false or absent."""
        p = cfg.get("privacy") if hasattr(cfg, "get") else None
        if p is None or not bool(p.get("enabled", False)):
            return None
        mech = {}
        for name in ("h_c", "grad", "fedavg"):
            m = p.get(name) or {}
            clip = m.get("clip")
            sigma = float(m.get("noise_multiplier", 0.0) or 0.0)
            if clip is not None and float(clip) <= 0:
                raise ValueError(f"privacy.{name}.clip must be positive or null, got {clip}")
            if sigma < 0:
                raise ValueError(f"privacy.{name}.noise_multiplier must be >= 0, got {sigma}")
            if clip is None and sigma > 0:
                raise ValueError(f"privacy.{name}.noise_multiplier={sigma} needs a clip norm: "
                                 f"noise is calibrated to it. Fix: set privacy.{name}.clip")
            mech[name] = Mechanism(None if clip is None else float(clip), sigma)
        delta = float(p.get("delta", 1e-6))
        if not 0 < delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {delta}")
        return cls(mech["h_c"], mech["grad"], mech["fedavg"], delta)


def release_seeds(seed: int, nodes: np.ndarray, round_: int, kind: str, counter: int
                  ) -> list[int]:
    """One 53-bit generator seed per node for one release: ``[K]`` Python ints.

    Row k depends only on (seed, nodes[k], round_, kind, counter) (see :mod:`cnfgnn.rng`).
    """
    extra = (KINDS[kind] << _KIND_SHIFT) | (int(counter) & ((1 << _KIND_SHIFT) - 1))
    u = rng.uniforms(int(seed), np.asarray(nodes, np.int64), int(round_), "dp", 1, extra=extra)
    return [int(v * float(1 << 53)) for v in u[:, 0]]


def clip_per_sample(x: Tensor, clip: float, sample_dims: int = 2) -> Tensor:
    """Scale each sample to L2 norm at most ``clip``.

    Args:
        x: ``[..., *sample]``, the last ``sample_dims`` dimensions form one sample
            (``[S, K, L, H]`` with ``sample_dims=2``: one sample per window and node).
        clip: the clip norm C.

    Returns:
        Same shape: ``x * min(1, C / ||x_sample||)``.
    """
    flat = x.flatten(start_dim=x.dim() - sample_dims)
    norm = flat.norm(dim=-1)  # [...]
    scale = (clip / norm.clamp_min(1e-12)).clamp(max=1.0)
    return x * scale.reshape(scale.shape + (1,) * sample_dims)


def per_node_noise(shape: tuple[int, ...], std: float, seeds: list[int], node_dim: int,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> Tensor:
    """Gaussian noise of std ``std``, node k's slice along ``node_dim`` from ``seeds[k]``.

    Each node's slice is drawn from its own ``torch.Generator`` (on the CPU, then moved), so
    it is the same whichever client hosts the node.
    """
    if shape[node_dim] != len(seeds):
        raise ValueError(f"{len(seeds)} seeds for {shape[node_dim]} nodes along dim {node_dim}")
    sub = shape[:node_dim] + shape[node_dim + 1:]
    parts = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        parts.append(torch.randn(sub, generator=g, dtype=torch.float32))
    return (torch.stack(parts, dim=node_dim) * std).to(device=device, dtype=dtype)


def privatize(x: Tensor, mech: Mechanism, seeds: list[int], node_dim: int = 1) -> Tensor:
    """Clip every ``[L, H]`` sample of ``x`` ``[S, K, L, H]`` to C and add N(0, (sigma C)^2).

    Identity when the mechanism is off (``clip`` null). ``seeds``: one per node (dim
    ``node_dim``), from :func:`release_seeds`.
    """
    if not mech.active:
        return x
    out = clip_per_sample(x, float(mech.clip))
    if mech.noise_multiplier > 0:
        out = out + per_node_noise(tuple(x.shape), mech.noise_multiplier * float(mech.clip),
                                   seeds, node_dim, x.device, x.dtype)
    return out


def clip_updates(before: dict[str, Tensor], after: dict[str, Tensor], clip: float
                 ) -> dict[str, Tensor]:
    """Clip each node's update to L2 norm ``clip`` over all its parameters.

    Args:
        before: ``name -> [K, ...]`` the global weights the nodes started from.
        after: ``name -> [K, ...]`` the weights after local training.

    Returns:
        ``name -> [K, ...]``: ``before + (after - before) * min(1, C / ||after_k - before_k||)``,
        Flower's ``compute_clip_model_update`` for every node k.
    """
    delta = {n: after[n].double() - before[n].double() for n in after}
    sq = sum(d.flatten(1).square().sum(1) for d in delta.values())  # [K]
    scale = (clip / sq.sqrt().clamp_min(1e-300)).clamp(max=1.0)  # [K]
    return {n: (before[n].double() + d * scale.reshape((-1,) + (1,) * (d.dim() - 1)))
            .to(after[n].dtype) for n, d in delta.items()}


def fedavg_noise_std(mech: Mechanism, num_sampled: int) -> float:
    """Noise std on the FedAvg mean: ``sigma * C / N`` (Flower's ``compute_stdv``)."""
    if num_sampled < 1:
        raise ValueError("FedAvg noise needs at least one sampled node")
    return float(mech.noise_multiplier * float(mech.clip or 0.0) / num_sampled)


def add_fedavg_noise(theta: dict[str, np.ndarray], mech: Mechanism, num_sampled: int,
                     seed: int, round_: int) -> dict[str, np.ndarray]:
    """The averaged node model plus N(0, (sigma C / N)^2) on every weight (server side).

    Args:
        theta: ``name -> [...]`` the FedAvg mean of the clipped node models.
        mech: the ``fedavg`` mechanism.
        num_sampled: N, the nodes asked to train this round.
        seed, round_: key of the round's generator.
    """
    std = fedavg_noise_std(mech, num_sampled)
    if std == 0:
        return theta
    g = torch.Generator().manual_seed(release_seeds(seed, np.zeros(1, np.int64), round_,
                                                    "fedavg", 0)[0])
    out = {}
    for name in sorted(theta):  # fixed order: the draws do not depend on dict order
        v = np.asarray(theta[name])
        z = torch.randn(v.shape, generator=g, dtype=torch.float64).numpy()
        out[name] = (v.astype(np.float64) + std * z).astype(v.dtype)
    return {name: out[name] for name in theta}
