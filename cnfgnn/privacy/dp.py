"""Differential privacy for what a node uploads: clipping and Gaussian noise (docs/privacy.md).

Plain PyTorch and numpy, no Flower import. Three mechanisms, each a Gaussian mechanism on
a clipped quantity, configured in ``conf/privacy/`` (``privacy=dp``; docs/privacy.md):

* ``h_c``: the temporal encoding of one window of one node, the ``[L, H]`` slice of an
  upload ``[S, K, L, H]``, clipped to L2 norm ``C`` and released with noise
  ``N(0, (sigma C)^2)`` on every element (node side, before sending).
* ``grad``: ``dL_k/dh_G`` of one window of one node (the ``[L, H]`` slice of
  ``[B, K, L, H]``), clipped and noised the same way (node side).
* ``fedavg``: each node's model update ``w_k - w_global`` clipped to norm ``C`` over all
  its parameters (node side, Flower's ``compute_clip_model_update``; a test checks they
  agree). ``fedavg.noise_at: node`` (default, distributed DP): each of the N nodes asked
  in the round adds ``N(0, (sigma C / sqrt(N))^2)`` to its clipped update before sending,
  so the *sum* of the N updates carries ``N(0, (sigma C)^2)`` and the server's uniform mean
  ``sigma C / N`` (Flower's ``compute_stdv``). ``noise_at: server``: central DP, the
  server (trusted: it sees every clipped update in the clear) adds ``sigma C / N`` to the mean.

Where the noise comes from. By default every draw comes from the operating system's
cryptographically secure generator (:func:`secure_normal`: ``os.urandom`` bytes through
Box-Muller), fresh for every release, so nobody (the server included, which knows the
whole run config) can regenerate and subtract it; runs with ``privacy=dp`` are therefore
not bit-reproducible. A ``torch.Generator`` seeded from ``secrets`` would not do: torch
keeps only the low 32 bits of a seed, and 2^32 seeds can be searched.
``privacy.insecure_replayable_noise: true`` restores the old keyed noise (one generator per
node and release seeded from (experiment seed, node, round, kind, counter) by
:func:`release_seeds`): repeatable, independent of how nodes are grouped into clients, and
**no protection against anyone holding the config**; final.json and the progress output
mark such a run insecure. The accounting is in :mod:`cnfgnn.privacy.accounting`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn import rng

#: Release kinds (part of the noise key; never reuse a code).
KINDS = {"h_c": 1, "grad": 2, "fedavg": 3, "sl_h_c": 4, "sl_grad": 5, "fedavg_node": 6}
NOISE_AT = ("node", "server")  # where the FedAvg noise is added
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
class SecAggSettings:
    """``privacy.secagg_plus``: Flower's SecAgg+ parameters (docs/privacy.md).

    Attributes:
        num_shares: shares of each node's secrets (``SecAggPlusWorkflow.num_shares``).
        reconstruction_threshold: shares needed to reconstruct; more dropouts than
            ``num_shares - reconstruction_threshold`` among a node's neighbours fail the round.
        clipping_range: every update element is clipped to ``[-r, r]`` before quantisation.
        quantization_range: integers per ``[-r, r]`` (``2**22``: step ``2 r / 2**22``).
        modulus_range: the modulus of the masked sums.
    """

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int


@dataclass(frozen=True)
class PrivacySettings:
    """The ``privacy`` config group, checked.

    Attributes:
        h_c, grad, fedavg: the three mechanisms.
        delta: the delta at which epsilon is reported.
        insecure_replayable_noise: noise keyed by the run config (tests only: the server
            can regenerate and subtract it); default False = OS-random noise.
        fedavg_noise_at: ``node`` (each node noises its own update, distributed DP) or
            ``server`` (central DP, trusted server).
        secagg: the FedAvg phase goes through SecAgg+, so the server sees only the sum of
            the noised updates (needs an engine that implements it).
        secagg_plus: SecAgg+ parameters.
        report_train_loss: nodes send their training-loss sums (un-noised) with DP on.
    """

    h_c: Mechanism
    grad: Mechanism
    fedavg: Mechanism
    delta: float
    insecure_replayable_noise: bool = False
    fedavg_noise_at: str = "node"
    secagg: bool = False
    secagg_plus: SecAggSettings | None = None
    report_train_loss: bool = False

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
                raise ValueError(
                    f"privacy.{name}.noise_multiplier={sigma} needs a clip norm: "
                    f"noise is calibrated to it. Fix: set privacy.{name}.clip"
                )
            mech[name] = Mechanism(None if clip is None else float(clip), sigma)
        delta = float(p.get("delta", 1e-6))
        if not 0 < delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {delta}")
        noise_at = str((p.get("fedavg") or {}).get("noise_at", "node"))
        if noise_at not in NOISE_AT:
            raise ValueError(f"privacy.fedavg.noise_at must be one of {NOISE_AT}, got {noise_at!r}")
        secagg_plus = None
        if p.get("secagg_plus") is not None:
            sa = dict(p.get("secagg_plus"))
            fields = set(SecAggSettings.__dataclass_fields__)
            if set(sa) != fields:
                raise ValueError(
                    f"privacy.secagg_plus needs exactly the keys {sorted(fields)}, "
                    f"got {sorted(sa)} (see conf/privacy/dp.yaml)"
                )
            secagg_plus = SecAggSettings(**sa)
            if not 2 <= secagg_plus.reconstruction_threshold <= secagg_plus.num_shares:
                raise ValueError(
                    "privacy.secagg_plus needs 2 <= reconstruction_threshold <= "
                    f"num_shares, got {secagg_plus}"
                )
        secagg = bool(p.get("secagg", False))
        if secagg and secagg_plus is None:
            raise ValueError("privacy.secagg=true needs privacy.secagg_plus (conf/privacy/dp.yaml)")
        if secagg and noise_at != "node":
            raise ValueError(
                "privacy.secagg=true hides the individual updates from the server, "
                "so the noise must be added on the nodes. Fix: "
                "privacy.fedavg.noise_at=node"
            )
        return cls(
            mech["h_c"],
            mech["grad"],
            mech["fedavg"],
            delta,
            insecure_replayable_noise=bool(p.get("insecure_replayable_noise", False)),
            fedavg_noise_at=noise_at,
            secagg=secagg,
            secagg_plus=secagg_plus,
            report_train_loss=bool(p.get("report_train_loss", False)),
        )


def fedavg_dp(privacy: PrivacySettings | None, aggregate: str) -> PrivacySettings | None:
    """The privacy settings when FedAvg uploads are clipped (DP on, a FedAvg clip norm, and
    ``federation.aggregate=fedavg``), else None. The server and the node both ask this."""
    if privacy is not None and privacy.fedavg.active and aggregate == "fedavg":
        return privacy
    return None


def release_seeds(seed: int, nodes: np.ndarray, round_: int, kind: str, counter: int) -> list[int]:
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


def secure_normal(shape: tuple[int, ...]) -> Tensor:
    """Standard normal draws from the OS's cryptographically secure generator.

    ``os.urandom`` bytes, 53 bits per uniform, through Box-Muller in float64: nothing in the
    run config (or any seed) determines them. Returns float64 ``shape``.
    """
    n = math.prod(shape)
    m = (n + 1) // 2
    bits = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m) >> np.uint64(11)
    u1 = (bits[0].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log is finite
    u2 = bits[1].astype(np.float64) * 2.0**-53  # [0, 1)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z.reshape(shape))


def per_node_noise(
    shape: tuple[int, ...],
    std: float,
    seeds: list[int] | None,
    node_dim: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian noise of std ``std`` for a ``shape`` tensor whose ``node_dim`` indexes nodes.

    ``seeds`` None (the default of every run): OS-random (:func:`secure_normal`).
    ``seeds`` given (``privacy.insecure_replayable_noise``): node k's slice along
    ``node_dim`` from its own ``torch.Generator`` seeded with ``seeds[k]`` (on the CPU, then
    moved), the same whichever client hosts the node, and replayable by anyone with the seeds.
    """
    if seeds is None:
        return (secure_normal(tuple(shape)) * std).to(device=device, dtype=dtype)
    if shape[node_dim] != len(seeds):
        raise ValueError(f"{len(seeds)} seeds for {shape[node_dim]} nodes along dim {node_dim}")
    sub = shape[:node_dim] + shape[node_dim + 1 :]
    parts = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        parts.append(torch.randn(sub, generator=g, dtype=torch.float32))
    return (torch.stack(parts, dim=node_dim) * std).to(device=device, dtype=dtype)


def privatize(x: Tensor, mech: Mechanism, seeds: list[int] | None, node_dim: int = 1) -> Tensor:
    """Clip every ``[L, H]`` sample of ``x`` ``[S, K, L, H]`` to C and add N(0, (sigma C)^2).

    Identity when the mechanism is off (``clip`` null). ``seeds``: None for OS-random noise,
    or one per node (dim ``node_dim``) from :func:`release_seeds` (insecure, replayable).
    """
    if not mech.active:
        return x
    out = clip_per_sample(x, float(mech.clip))
    if mech.noise_multiplier > 0:
        out = out + per_node_noise(
            tuple(x.shape),
            mech.noise_multiplier * float(mech.clip),
            seeds,
            node_dim,
            x.device,
            x.dtype,
        )
    return out


def clip_updates(
    before: dict[str, Tensor], after: dict[str, Tensor], clip: float
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
    return {
        n: (before[n].double() + d * scale.reshape((-1,) + (1,) * (d.dim() - 1))).to(after[n].dtype)
        for n, d in delta.items()
    }


def fedavg_noise_std(mech: Mechanism, num_sampled: int) -> float:
    """Noise std on the FedAvg mean of N nodes: ``sigma * C / N`` (Flower's ``compute_stdv``)."""
    if num_sampled < 1:
        raise ValueError("FedAvg noise needs at least one sampled node")
    return float(mech.noise_multiplier * float(mech.clip or 0.0) / num_sampled)


def node_update_noise_std(mech: Mechanism, num_sampled: int) -> float:
    """Noise std each node adds to its own clipped update: ``sigma * C / sqrt(N)``.

    N nodes asked, all answering: the sum carries ``sigma * C``, the uniform mean
    ``sigma * C / N`` (= :func:`fedavg_noise_std`). With A < N answering, the sum carries
    ``sigma * C * sqrt(A / N)`` (the accountant uses that).
    """
    if num_sampled < 1:
        raise ValueError("FedAvg noise needs at least one sampled node")
    return float(mech.noise_multiplier * float(mech.clip or 0.0) / math.sqrt(num_sampled))


def noise_updates(
    state: dict[str, Tensor], std: float, seeds: list[int] | None
) -> dict[str, Tensor]:
    """Add N(0, std^2) to every weight of K nodes' models (node side, distributed DP).

    Args:
        state: ``name -> [K, ...]`` each node's clipped model ``w_global + clip(update)``.
        std: per-element std, :func:`node_update_noise_std`.
        seeds: None = OS-random; else one per node (insecure, replayable), node k drawing
            every parameter (sorted by name) from its own generator.
    """
    if std == 0:
        return state
    names = sorted(state)
    if seeds is None:
        noise = {n: secure_normal(tuple(state[n].shape)) for n in names}
    else:
        k = next(iter(state.values())).shape[0]
        if len(seeds) != k:
            raise ValueError(f"{len(seeds)} seeds for {k} nodes")
        rows: dict[str, list[Tensor]] = {n: [] for n in names}
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            for n in names:
                rows[n].append(
                    torch.randn(tuple(state[n].shape[1:]), generator=g, dtype=torch.float64)
                )
        noise = {n: torch.stack(rows[n]) for n in names}
    return {n: (v.double() + std * noise[n].to(v.device)).to(v.dtype) for n, v in state.items()}


def add_fedavg_noise(
    theta: dict[str, np.ndarray], mech: Mechanism, num_sampled: int, seed: int | None, round_: int
) -> dict[str, np.ndarray]:
    """The averaged node model plus N(0, (sigma C / N)^2) on every weight (server side).

    Central DP (``privacy.fedavg.noise_at: server``): the server, trusted, saw the clipped
    updates before adding this.

    Args:
        theta: ``name -> [...]`` the FedAvg mean of the clipped node models.
        mech: the ``fedavg`` mechanism.
        num_sampled: N, the nodes asked to train this round.
        seed, round_: key of the round's generator (insecure, replayable); ``seed`` None:
            OS-random noise.
    """
    std = fedavg_noise_std(mech, num_sampled)
    if std == 0:
        return theta
    g = (
        None
        if seed is None
        else torch.Generator().manual_seed(
            release_seeds(seed, np.zeros(1, np.int64), round_, "fedavg", 0)[0]
        )
    )
    out = {}
    for name in sorted(theta):  # fixed order: the draws do not depend on dict order
        v = np.asarray(theta[name])
        z = (
            secure_normal(v.shape)
            if g is None
            else torch.randn(v.shape, generator=g, dtype=torch.float64)
        ).numpy()
        out[name] = (v.astype(np.float64) + std * z).astype(v.dtype)
    return {name: out[name] for name in theta}
