"""Privacy accounting of a run with Opacus's RDP accountant (issue 8).

The protected unit is **one training window of one node** (its ``in_steps`` inputs and
``out_steps`` targets), under add/remove adjacency (Opacus's convention; under replace-one
the sensitivity doubles, so the same epsilon needs twice the noise multiplier).

Every mechanism releases a clipped per-window quantity with Gaussian noise, and the row of
window w depends on no other window (the node model and ``h_G`` it is computed with are
themselves outputs of noised releases, so post-processing). The server chooses the
batches and sees which window each row belongs to, so there is **no amplification by
subsampling**: each release of window w counts as a full Gaussian mechanism (sample rate
1). Per round of CNFGNN a training window is released

* once as ``h_c`` (the train-split encode),
* ``R_s`` times as ``dL/dh_G`` (once per server epoch: every window is in one batch),
* once through FedAvg (the node's whole update, clipped; noise ``sigma C / N`` on the mean
  of N nodes, i.e. ``sigma C`` on the sum: node-level, hence also window-level).

Split learning (no alternation) releases each window once as ``h_c`` and once as
``dL/dh_G`` per round (epoch) and uploads no weights. All releases compose (RDP).

Not covered, and so not part of epsilon: the scaler statistics (``STATS``, once at setup,
global scaling only), the per-node training-loss sums returned with every local-training
and split-learning reply, and validation/test error sums (the validation and test windows
are not the protected unit; their ``h_c`` uploads are noised like the training ones).
Overlapping sliding windows: one time step of a series lies in up to ``in_steps +
out_steps`` windows (24 at 12 + 12), so a time step, or a sensor's day, is protected only
by group privacy over those windows (roughly ``k`` times the epsilon for ``k`` windows).
"""

from __future__ import annotations

import math
from typing import Any

from cnfgnn.privacy.dp import Mechanism, PrivacySettings

#: The unit epsilon is stated for (written into final.json).
UNIT = "one training window of one node (add/remove adjacency)"
NOT_COVERED = ["scaler statistics (setup, global scaling)",
               "per-node training-loss sums in local-training and split replies",
               "validation/test error sums (validation/test windows are not the protected unit)",
               "time steps shared by overlapping windows (group privacy over up to "
               "in_steps + out_steps windows)"]


def rdp_epsilon(steps: list[tuple[float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of composed Gaussian mechanisms, Opacus ``RDPAccountant``.

    Args:
        steps: ``(noise_multiplier, releases)`` pairs, each release at sample rate 1.
        delta: target delta.
    """
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for sigma, count in steps:
        for _ in range(int(count)):  # consecutive equal steps are merged by Opacus
            acc.step(noise_multiplier=float(sigma), sample_rate=1.0)
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=delta))


def privacy_report(settings: PrivacySettings, releases: dict[str, int]) -> dict[str, Any]:
    """The ``privacy`` block of ``final.json``.

    Args:
        settings: the run's mechanisms and delta.
        releases: how many times one training window was released per mechanism
            (``h_c``, ``grad``, ``fedavg``) and ``raw``: un-noised weight uploads (FMTL).

    Returns:
        dict with ``epsilon`` (None = unbounded: something data-dependent was released
        without noise, named in ``not_private``), ``delta``, per-mechanism epsilons,
        settings, release counts, the accountant, the unit and what is not covered.
    """
    import opacus

    mechs: dict[str, Mechanism] = {"h_c": settings.h_c, "grad": settings.grad,
                                   "fedavg": settings.fedavg}
    not_private = [name for name, m in mechs.items()
                   if releases.get(name, 0) > 0 and not m.private]
    if releases.get("raw", 0) > 0:
        not_private.append("model weights uploaded without the fedavg mechanism")
    per = {name: (rdp_epsilon([(m.noise_multiplier, releases.get(name, 0))], settings.delta)
                  if m.private else (math.inf if releases.get(name, 0) else 0.0))
           for name, m in mechs.items()}
    if not_private:
        eps = math.inf
    else:
        eps = rdp_epsilon([(m.noise_multiplier, releases.get(n, 0))
                           for n, m in mechs.items() if releases.get(n, 0)], settings.delta)
    return {
        "epsilon": eps, "delta": settings.delta, "epsilon_per_mechanism": per,
        "not_private": not_private,
        "mechanisms": {n: {"clip": m.clip, "noise_multiplier": m.noise_multiplier}
                       for n, m in mechs.items()},
        "releases_per_window": {k: int(v) for k, v in releases.items()},
        "accountant": f"opacus.accountants.RDPAccountant (opacus {opacus.__version__}), "
                      "sample rate 1 per release",
        "unit": UNIT, "not_covered": NOT_COVERED,
    }


def describe(report: dict[str, Any]) -> str:
    """One progress line: epsilon at delta, or why it is unbounded."""
    eps = report["epsilon"]
    if eps is None or not math.isfinite(eps):
        return (f"privacy: epsilon unbounded at delta={report['delta']:g} "
                f"(not noised: {', '.join(report['not_private'])})")
    return (f"privacy: epsilon = {eps:.3g} at delta = {report['delta']:g} for {UNIT}; "
            f"releases per window {report['releases_per_window']}")
