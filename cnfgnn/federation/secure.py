"""The FedAvg phase through secure aggregation: the math on both sides (docs/privacy.md).

Under ``privacy.secagg=true`` the server learns only the sum of the clients' FedAvg
contributions; an engine with ``secure_aggregation`` carries it (the Flower engine runs
Flower's SecAgg+, see ``cnfgnn/flower/secagg.py``). This module never imports flwr:

* a client's contribution is the sum over its K hosted nodes of each node's clipped and
  noised *update* ``w_k - theta`` (one array per tensor, the shape of one node's tensor),
  so its elements stay within a small range that SecAgg+ can quantise;
* the engine returns the mean of the contributions over the A_c clients whose masked
  vector reached the sum; the new global model is ``theta + mean * A_c / A_n`` with
  A_n the nodes of those clients (the uniform node average DP uses, docs/privacy.md);
* :func:`check_secagg_range` refuses settings whose quantisation range would clip a
  contribution or whose modular sum could overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cnfgnn.federation import protocol as P


@dataclass
class SecureSum:
    """What the server learns from one securely aggregated FedAvg phase.

    Attributes:
        mean: ``name -> [...]`` float64: the mean of the clients' contributions.
        clients: clients whose contribution is in the sum.
        failures: client -> reason, for the clients asked but left out.
        step: the largest step counter the clients reported (a public counter).
        bytes_down / bytes_up: serialized bytes of the phase (all its round trips).
        round_trips: messages exchanged per client.
        seconds: wall time of the phase.
    """

    mean: dict[str, np.ndarray]
    clients: list[int]
    failures: dict[int, str] = field(default_factory=dict)
    step: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    round_trips: int = 0
    seconds: float = 0.0


def tensor_names(payload: P.Payload) -> list[str]:
    """Sorted tensor names of the global model in a ``train.local`` request."""
    names = sorted(P.weights_from_payload(payload))
    if not names:
        raise ValueError(
            f"{P.LOCAL_TRAIN} under privacy.secagg needs the global model in the "
            "request (the contribution is the update w_k - theta)"
        )
    return names


def client_contribution(request: P.Payload, reply: P.Payload) -> list[np.ndarray]:
    """Sum over the client's nodes of ``w_k - theta``, one float64 array per tensor.

    Args:
        request: the ``train.local`` request (``w.<name>``: ``[...]``, the global model).
        reply: the node's reply (``w.<name>``: ``[K, ...]``, clipped and noised weights).

    Returns:
        ``[sum_k (w_k - theta)]`` per tensor in :func:`tensor_names` order, shape ``[...]``.
    """
    global_model, node_models = P.weights_from_payload(request), P.weights_from_payload(reply)
    out = []
    for name in tensor_names(request):
        theta = np.asarray(global_model[name], np.float64)
        w = np.asarray(node_models[name], np.float64)  # [K, ...]
        out.append((w - theta[None]).sum(0))
    return out


def apply_secure_mean(
    theta: dict[str, np.ndarray], result: SecureSum, nodes_answered: int
) -> dict[str, np.ndarray]:
    """The new global model ``theta + mean * A_c / A_n`` (float32, like :func:`fedavg`)."""
    if nodes_answered <= 0 or not result.clients:
        raise ValueError("secure FedAvg: no client's contribution reached the sum")
    scale = len(result.clients) / nodes_answered
    return {
        k: (np.asarray(v, np.float64) + result.mean[k] * scale).astype(np.float32)
        for k, v in theta.items()
    }


def check_secagg_range(
    clip: float,
    noise_multiplier: float,
    max_nodes_per_client: int,
    nodes_asked: int,
    clients: int,
    clipping_range: float,
    quantization_range: int,
    modulus_range: int,
    tail_std: float = 8.0,
) -> None:
    """Refuse SecAgg+ settings that would clip a contribution or overflow the modular sum.

    A contribution element is at most ``K C`` plus noise of std ``sigma C sqrt(K / N)``; it
    must stay within ``clipping_range`` with ``tail_std`` standard deviations to spare.
    The sum of A clients' quantised values (each in ``[0, Q]``) must stay below ``M``.
    """
    k = max(int(max_nodes_per_client), 1)
    need = k * clip + tail_std * noise_multiplier * clip * math.sqrt(k / max(nodes_asked, 1))
    if clipping_range < need:
        raise ValueError(
            f"privacy.secagg_plus.clipping_range={clipping_range:g} is below {need:.3g} "
            f"(K C + {tail_std:g} noise std with K={k} nodes per client, C={clip:g}, "
            f"sigma={noise_multiplier:g}, N={nodes_asked}): SecAgg+ would clip updates. "
            "Fix: raise privacy.secagg_plus.clipping_range in conf/privacy/dp.yaml"
        )
    if clients * quantization_range >= modulus_range:
        raise ValueError(
            f"privacy.secagg_plus: {clients} clients x quantization_range={quantization_range} "
            f">= modulus_range={modulus_range}: the masked sum would overflow. Fix: lower "
            "quantization_range or raise modulus_range (a power of 2) in conf/privacy/dp.yaml"
        )
