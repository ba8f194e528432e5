"""Forecast metrics on de-normalised values: MAE, RMSE (averaged over horizons and per
horizon) and MAPE over non-zero truths only."""

from __future__ import annotations

import numpy as np


def forecast_metrics(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None,
                     per_horizon: bool = True) -> dict:
    """pred, true: (B, H, N) in data units; mask: optional bool (B, H, N) of cells to score.

    MAE and RMSE use every masked cell; MAPE only cells with |true| > 1e-6 (in %).
    Returns {"mae", "rmse", "mape", "n", "horizon": [{"mae","rmse","mape"}, ...]}.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} vs true {true.shape}")
    m = np.ones_like(true, dtype=bool) if mask is None else np.broadcast_to(mask, true.shape)
    out = _scores(pred, true, m)
    if per_horizon and pred.ndim >= 2:
        out["horizon"] = [_scores(pred[:, h], true[:, h], m[:, h]) for h in range(pred.shape[1])]
    return out


def _scores(pred: np.ndarray, true: np.ndarray, m: np.ndarray) -> dict:
    n = int(m.sum())
    if n == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "mape": float("nan"), "n": 0}
    err = (pred - true)[m]
    t = true[m]
    nz = np.abs(t) > 1e-6
    mape = float(np.mean(np.abs(err[nz]) / np.abs(t[nz])) * 100) if nz.any() else float("nan")
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "mape": mape, "n": n}


def summarise_seeds(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one seed)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0
