"""Forecast error sums and the metrics of both protocols.

Nodes never send predictions: they send, per node and horizon step, sums and counts of
errors. Summing those over nodes gives exactly the pooled metric (not an average of
averages). Two protocols come from the same sums:

* the paper's: unmasked RMSE and MAE over every window x horizon x node, in original units
  (missing readings, zeros, are kept as targets);
* the field's: masked MAE / RMSE / MAPE at horizons 3, 6, 12 and averaged over the 12
  steps; a missing (masked) target never enters, and MAPE never divides by a zero target.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Names of the per-horizon sums a node reports: each is ``[K, horizon]``.
SUM_KEYS = (
    "sq",  # unmasked squared error
    "abs",  # unmasked absolute error
    "count",  # unmasked count
    "sq_scaled",  # unmasked squared error in scaled units (the training loss)
    "m_sq",  # masked squared error
    "m_abs",  # masked absolute error
    "m_ape",  # masked absolute percentage error (targets != 0)
    "m_count",  # masked count
    "m_ape_count",  # count of masked targets that are non-zero
)


def error_sums(
    pred: Tensor, target: Tensor, mask: Tensor, pred_scaled: Tensor, target_scaled: Tensor
) -> dict[str, Tensor]:
    """Per-node, per-horizon error sums of one batch.

    Args:
        pred: predictions in original units ``[B, H, K]``.
        target: targets in original units ``[B, H, K]``.
        mask: ``[B, H, K]`` bool, True where the target was observed.
        pred_scaled: predictions in scaled units ``[B, H, K]``.
        target_scaled: targets in scaled units ``[B, H, K]``.

    Returns:
        dict of :data:`SUM_KEYS` -> ``[K, H]`` float64 tensors.
    """
    err = (pred - target).double()
    m = mask.double()
    nonzero = m * (target != 0).double()
    safe = torch.where(target != 0, target, torch.ones_like(target)).double()
    out = {
        "sq": err.square().sum(0),
        "abs": err.abs().sum(0),
        "count": torch.full_like(err[0], float(err.shape[0])),
        "sq_scaled": (pred_scaled - target_scaled).double().square().sum(0),
        "m_sq": (err.square() * m).sum(0),
        "m_abs": (err.abs() * m).sum(0),
        "m_ape": ((err / safe).abs() * nonzero).sum(0),
        "m_count": m.sum(0),
        "m_ape_count": nonzero.sum(0),
    }
    return {k: v.transpose(0, 1).contiguous() for k, v in out.items()}  # [K, H]


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    den_sum = float(np.sum(den))
    return float(np.sum(num) / den_sum) if den_sum > 0 else float("nan")


def metrics_from_sums(sums: dict[str, np.ndarray], horizons=(3, 6, 12)) -> dict[str, float]:
    """Both metric protocols from summed errors.

    Args:
        sums: :data:`SUM_KEYS` -> ``[K, H]`` (or ``[H]``) arrays, summed over windows.
        horizons: 1-based horizon steps to report separately (3, 6, 12 = 15/30/60 min).

    Returns:
        ``rmse``/``mae`` (paper protocol, all horizons, unmasked), ``loss`` (scaled MSE),
        ``masked_{mae,rmse,mape}`` averaged over all steps and ``masked_*_h{n}`` per step.
    """
    s = {k: np.asarray(v, dtype=np.float64).reshape(-1, np.shape(v)[-1]) for k, v in sums.items()}
    out = {
        "rmse": float(np.sqrt(_ratio(s["sq"], s["count"]))),
        "mae": _ratio(s["abs"], s["count"]),
        "loss": _ratio(s["sq_scaled"], s["count"]),
        "masked_mae": _ratio(s["m_abs"], s["m_count"]),
        "masked_rmse": float(np.sqrt(_ratio(s["m_sq"], s["m_count"]))),
        "masked_mape": _ratio(s["m_ape"], s["m_ape_count"]),
    }
    for h in horizons:
        i = h - 1
        if i >= s["sq"].shape[1]:
            continue
        out[f"masked_mae_h{h}"] = _ratio(s["m_abs"][:, i], s["m_count"][:, i])
        out[f"masked_rmse_h{h}"] = float(np.sqrt(_ratio(s["m_sq"][:, i], s["m_count"][:, i])))
        out[f"masked_mape_h{h}"] = _ratio(s["m_ape"][:, i], s["m_ape_count"][:, i])
        out[f"rmse_h{h}"] = float(np.sqrt(_ratio(s["sq"][:, i], s["count"][:, i])))
    return out


def per_horizon(sums: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Metrics for every horizon step: lists of length H (for plots and reports)."""
    s = {
        k: np.asarray(v, dtype=np.float64).reshape(-1, np.shape(v)[-1]).sum(0)
        for k, v in sums.items()
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "rmse": np.sqrt(s["sq"] / s["count"]).tolist(),
            "mae": (s["abs"] / s["count"]).tolist(),
            "masked_mae": (s["m_abs"] / s["m_count"]).tolist(),
            "masked_rmse": np.sqrt(s["m_sq"] / s["m_count"]).tolist(),
            "masked_mape": (s["m_ape"] / s["m_ape_count"]).tolist(),
        }


def node_mean_loss(sums: dict[str, np.ndarray]) -> float:
    """Validation loss the paper stops on: mean over nodes of each node's scaled MSE."""
    per_node = np.sum(sums["sq_scaled"], axis=-1) / np.maximum(np.sum(sums["count"], axis=-1), 1)
    return float(np.mean(per_node))
