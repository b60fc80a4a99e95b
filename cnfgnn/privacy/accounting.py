"""Privacy accounting of a run (issues 8, 15; docs/privacy.md).

**Unit and adjacency.** One training window of one node (its ``in_steps`` inputs and
``out_steps`` targets), *replaced* by another window (replace-one adjacency). The number of
windows each node holds is public (the handshake sends it), so add/remove of a window is
not hidden by anything here; replace-one is the adjacency the released quantities allow.

**Sensitivity 2C.** Every protected release is a clipped quantity: a per-window row (``h_c``,
``dL/dh_G``) or a node's whole model update (FedAvg), clipped to L2 norm ``C``. Replacing one
window moves such a quantity anywhere inside the ball of radius ``C``, so by at most ``2C``.
With Gaussian noise of std ``sigma C`` the mechanism has noise multiplier ``sigma / 2``
relative to its sensitivity; the accountant is fed that. No amplification by subsampling:
the server picks the batches and knows which window each row is (sample rate 1).

**What the server sees of FedAvg** (``fedavg.noise_at``):

* ``node`` with ``secagg`` (only the sum of the A answering updates is visible, N asked):
  the sum carries ``N(0, sigma^2 C^2 A / N)``, multiplier ``sigma sqrt(A/N) / 2`` per round.
* ``node`` without ``secagg``: each node's update is visible with its own noise
  ``sigma C / sqrt(N)``, multiplier ``sigma / (2 sqrt(N))`` per round against the server
  (the released model carries ``sigma sqrt(A/N) / 2``, the secagg figure).
* ``server``: central DP. The trusted server sees each clipped update in the clear
  (unbounded against it); the released model carries ``sigma C / N`` on the uniform mean
  of A updates, multiplier ``sigma A / (2 N)``.

Per round a training window is released once as ``h_c`` (train-split encode), ``R_s`` times
as ``dL/dh_G`` (once per server epoch) and once through FedAvg; all compose (RDP). Per-row
accounting of ``h_c`` and ``dL/dh_G`` is sound only when the model computing them is itself
an output of the FedAvg mechanism (CNFGNN: the node encodes and decodes with the global
model), so the row of window w depends on w and on released values only. Methods where
each node keeps its own model (split learning, AT w/o FedAvg, FMTL, local) compute those
rows, and their validation sums, with a model trained without noise on all the node's
windows: epsilon is reported unbounded (None in final.json) with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnfgnn.privacy.dp import Mechanism, PrivacySettings

#: The unit epsilon is stated for (written into final.json).
UNIT = "one training window of one node"
ADJACENCY = (
    "replace-one (the windows per node are public: the handshake sends them); "
    "sensitivity of every clipped release 2C"
)
SENSITIVITY_FACTOR = 2.0  # replace-one: a clipped quantity moves by at most 2C
NOT_COVERED = [
    "time steps shared by overlapping windows (group privacy over up to "
    "in_steps + out_steps windows, roughly k times epsilon for k windows)",
    "validation and test windows (not the protected unit)",
    "floating-point artefacts of the Gaussian sampler (not hardened)",
]


def _orders() -> np.ndarray:
    from opacus.accountants import RDPAccountant

    return np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=np.float64)


def rdp_epsilon(steps: Sequence[tuple[float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of composed Gaussian mechanisms, each at sample rate 1.

    The Renyi DP of a Gaussian mechanism with noise multiplier ``z`` (std / sensitivity)
    at order ``a`` is ``a / (2 z^2)``; releases add up; the conversion to (epsilon, delta)
    is Balle et al. 2020, Thm. 21, minimised over Opacus's default orders (what Opacus's
    ``RDPAccountant`` computes; a test checks equality).

    Args:
        steps: ``(noise_multiplier, releases)`` pairs; a multiplier of 0 gives inf.
        delta: target delta.
    """
    steps = [(float(z), int(n)) for z, n in steps if int(n) > 0]
    if not steps:
        return 0.0
    if any(z <= 0 for z, _ in steps):
        return math.inf
    a = _orders()
    rdp = sum(n * a / (2.0 * z * z) for z, n in steps)
    eps = rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    return float(np.nanmin(eps))


def fedavg_multipliers(
    settings: PrivacySettings, rounds: Sequence[tuple[int, int]], against_server: bool
) -> list[float]:
    """Noise multiplier (std / 2C) of each FedAvg release, one per round.

    Args:
        settings: the run's privacy settings.
        rounds: ``(answered A, asked N)`` nodes per FedAvg round.
        against_server: the server's view (else: what the released models carry).
    """
    m = settings.fedavg
    if not m.private:
        return [0.0] * len(rounds)
    s, f = m.noise_multiplier, SENSITIVITY_FACTOR
    out = []
    for a, n in rounds:
        if settings.fedavg_noise_at == "server":
            out.append(0.0 if against_server else s * a / (f * n))
        elif against_server and not settings.secagg:
            out.append(s / (f * math.sqrt(n)))
        else:
            out.append(s * math.sqrt(a / n) / f)
    return out


def _unbounded(
    settings: PrivacySettings, releases: dict[str, int], per_node_models: bool, global_scaling: bool
) -> list[str]:
    """Why no finite epsilon holds against anyone (empty: the accounting bounds the leak)."""
    why = []
    mechs: dict[str, Mechanism] = {
        "h_c": settings.h_c,
        "grad": settings.grad,
        "fedavg": settings.fedavg,
    }
    why += [
        f"{name} released without noise (clip or noise_multiplier unset)"
        for name, m in mechs.items()
        if releases.get(name, 0) > 0 and not m.private
    ]
    if releases.get("raw", 0) > 0:
        why.append("model weights uploaded without the fedavg mechanism (FMTL)")
    if per_node_models and (releases.get("h_c", 0) or releases.get("grad", 0)):
        why.append(
            "h_c / dL/dh_G computed by each node's own model, trained without noise on "
            "all its windows: a row's noise does not bound what one window leaks"
        )
    if per_node_models:
        why.append(
            "validation/test error sums computed by each node's own model, trained "
            "without noise on all its windows"
        )
    if settings.report_train_loss:
        why.append("training-loss sums sent without noise (privacy.report_train_loss=true)")
    if global_scaling:
        why.append(
            "global scaler statistics (per-node sums, sums of squares and counts of the "
            "training inputs) sent once at setup without noise; "
            "use federation.scaling=per_node"
        )
    if settings.insecure_replayable_noise:
        why.append(
            "INSECURE: noise keyed by the run config "
            "(privacy.insecure_replayable_noise=true): anyone with the config removes it"
        )
    return why


def unprotected(
    settings: PrivacySettings, global_scaling: bool, forecasts_released: bool = False
) -> list[str]:
    """Everything data-dependent that leaves a node without noise."""
    out = [
        "validation/test error sums and counts per node and horizon (every round / once)",
        "sample counts per node (num_examples = training windows x local epochs; the window "
        "counts are public from the handshake)",
    ]
    if forecasts_released:
        out.append("test forecasts of the sensors in predictions.npz (predictions.release=true)")
    if settings.report_train_loss:
        out.insert(0, "training-loss sums and counts per node (privacy.report_train_loss=true)")
    if global_scaling:
        out.append("scaler statistics: per-node sum, sum of squares, count of training inputs")
    return out


def privacy_report(
    settings: PrivacySettings,
    releases: dict[str, int],
    *,
    fedavg_rounds: Sequence[tuple[int, int]] = (),
    per_node_models: bool = False,
    global_scaling: bool = False,
    forecasts_released: bool = False,
) -> dict[str, Any]:
    """The ``privacy`` block of ``final.json``.

    Args:
        settings: the run's mechanisms, delta, noise placement.
        releases: how many times one training window was released per mechanism
            (``h_c``, ``grad``, ``fedavg``) and ``raw``: un-noised weight uploads (FMTL).
        fedavg_rounds: ``(answered, asked)`` nodes of each FedAvg round.
        per_node_models: every node keeps its own model (split learning, AT w/o FedAvg,
            FMTL, local).
        global_scaling: the global scaler's statistics were sent (``federation.scaling``).
        forecasts_released: nodes sent their test forecasts (``predictions.release``).

    Returns:
        dict with ``epsilon`` (None in final.json = unbounded, reasons in ``not_private``)
        under ``threat_model``, ``epsilon_against_server``, ``epsilon_with_secagg`` (what
        the same releases give with ``privacy.secagg=true``; None with server-side noise),
        ``delta``, per-mechanism epsilons, the effective noise multipliers, ``unprotected``
        (what leaves a node without noise), settings, release counts, the accountant, unit
        and adjacency.
    """
    import opacus

    rounds = [(int(a), int(n)) for a, n in fedavg_rounds]
    if len(rounds) < releases.get("fedavg", 0):  # older checkpoints: assume all answered
        n = rounds[-1][1] if rounds else 1
        rounds += [(n, n)] * (releases.get("fedavg", 0) - len(rounds))
    f = SENSITIVITY_FACTOR
    rows = {
        name: (m.noise_multiplier / f, releases.get(name, 0))
        for name, m in (("h_c", settings.h_c), ("grad", settings.grad))
    }
    why = _unbounded(settings, releases, per_node_models, global_scaling)
    central = settings.fedavg_noise_at == "server"

    def total(against_server: bool) -> tuple[float, dict[str, float]]:
        fed = [(z, 1) for z in fedavg_multipliers(settings, rounds, against_server)]
        per = {
            "h_c": rdp_epsilon([rows["h_c"]], settings.delta),
            "grad": rdp_epsilon([rows["grad"]], settings.delta),
            "fedavg": rdp_epsilon(fed, settings.delta),
        }
        if why:
            return math.inf, per
        return rdp_epsilon([rows["h_c"], rows["grad"], *fed], settings.delta), per

    eps, per = total(against_server=False)
    eps_server, per_server = total(against_server=True)
    # with node noise, secure aggregation shows the server only the sum: the released
    # model's figure; with server noise SecAgg+ cannot apply (the server must see updates)
    eps_secagg = None if central else eps
    if central:
        threat = (
            "central DP with a TRUSTED server: epsilon bounds what anyone who sees the "
            "trained models learns; the server itself sees every clipped update in the "
            "clear (epsilon_against_server is unbounded)"
        )
    else:
        threat = (
            "distributed DP: epsilon bounds what the server (honest-but-curious) and "
            "anyone it shares with learn"
            + (
                ", the FedAvg phase under secure aggregation (the server sees only the sum)"
                if settings.secagg
                else "; no secure aggregation, so the server sees "
                "each node's update with its own share of "
                "the noise"
            )
        )
        eps, per = eps_server, per_server
    m = settings.fedavg
    return {
        "epsilon": eps,
        "delta": settings.delta,
        "threat_model": threat,
        "epsilon_against_server": eps_server,
        "epsilon_with_secagg": eps_secagg,
        "epsilon_per_mechanism": per,
        "not_private": why,
        "unprotected": unprotected(settings, global_scaling, forecasts_released),
        "insecure_replayable_noise": settings.insecure_replayable_noise,
        "noise_source": (
            "INSECURE: generators seeded from the run config (replayable)"
            if settings.insecure_replayable_noise
            else "os.urandom (the OS's CSPRNG), fresh per release, on the node"
        ),
        "fedavg": {
            "noise_at": settings.fedavg_noise_at,
            "secagg": settings.secagg,
            "weighting": "uniform over the nodes that answered (forced under privacy=dp)",
            "noise": (
                "each of the N nodes asked adds N(0, (sigma C / sqrt N)^2) to its clipped "
                "update; the sum of the A answering carries N(0, sigma^2 C^2 A / N)"
                if not central
                else "the server adds N(0, (sigma C / N)^2) to the mean of the clipped updates"
            ),
            "rounds_answered_asked": [list(r) for r in rounds],
            "multipliers_against_server": fedavg_multipliers(settings, rounds, True),
            "multipliers_released_model": fedavg_multipliers(settings, rounds, False),
        }
        if m.active
        else None,
        "mechanisms": {
            n: {"clip": mm.clip, "noise_multiplier": mm.noise_multiplier}
            for n, mm in (
                ("h_c", settings.h_c),
                ("grad", settings.grad),
                ("fedavg", settings.fedavg),
            )
        },
        "releases_per_window": {k: int(v) for k, v in releases.items()},
        "accountant": (
            "Renyi DP of the Gaussian mechanism at sample rate 1 over Opacus's "
            f"default orders (= opacus.accountants.RDPAccountant, opacus "
            f"{opacus.__version__}); noise multiplier = noise std / (2 C)"
        ),
        "unit": UNIT,
        "adjacency": ADJACENCY,
        "not_covered": NOT_COVERED,
    }


def describe(report: dict[str, Any]) -> str:
    """One progress line: epsilon at delta, or why it is unbounded; insecure runs say so."""
    eps = report["epsilon"]
    warn = "INSECURE replayable noise; " if report.get("insecure_replayable_noise") else ""
    if eps is None or not math.isfinite(eps):
        return (
            f"privacy: {warn}epsilon unbounded at delta={report['delta']:g} "
            f"({'; '.join(report['not_private']) or 'against the server'})"
        )
    central = report["fedavg"] and report["fedavg"]["noise_at"] == "server"
    whom = "central DP, trusted server" if central else "against the server"
    return (
        f"privacy: {warn}epsilon = {eps:.3g} at delta = {report['delta']:g} for {UNIT} "
        f"({whom}); "
        f"releases per window {report['releases_per_window']}"
    )
