"""Latency-predictor accuracy metrics, as nn-Meter and HAT report them.

Relative errors, not absolute ones: a 2 ms miss matters on a 20 ms decode step and not on a
400 ms prefill, and the search stage compares sub-networks *across* that range. Kendall's tau
is reported because the search only needs the predictor to *rank* sub-networks correctly.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import kendalltau

ACCURACY_BANDS = (0.05, 0.10, 0.15)


def _pair(measured, predicted) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(measured, dtype=np.float64).ravel()
    p = np.asarray(predicted, dtype=np.float64).ravel()
    if m.shape != p.shape:
        raise ValueError(f"{m.size} measured values but {p.size} predictions")
    if m.size == 0:
        raise ValueError("no values to score")
    if np.any(m <= 0):
        raise ValueError("measured latencies must be positive")
    return m, p


def relative_errors(measured, predicted) -> np.ndarray:
    """Signed (predicted - measured) / measured per sample."""
    m, p = _pair(measured, predicted)
    return (p - m) / m


def mape(measured, predicted) -> float:
    """Mean absolute percentage error, in percent."""
    return float(100 * np.mean(np.abs(relative_errors(measured, predicted))))


def rmspe(measured, predicted) -> float:
    """Root mean squared percentage error, in percent."""
    return float(100 * np.sqrt(np.mean(relative_errors(measured, predicted) ** 2)))


def accuracy_within(measured, predicted, band: float) -> float:
    """Share (0..1) of predictions within ``±band`` relative error (nn-Meter's ±10% accuracy)."""
    return float(np.mean(np.abs(relative_errors(measured, predicted)) <= band + 1e-12))


def kendall_tau(measured, predicted) -> float:
    """Rank agreement (tau-b); NaN when fewer than two samples or a constant input."""
    m, p = _pair(measured, predicted)
    if m.size < 2:
        return float("nan")
    return float(kendalltau(m, p).statistic)


def summarize(measured, predicted) -> dict[str, float]:
    """All metrics in one dict (percentages in percent, accuracies as 0..1)."""
    m, p = _pair(measured, predicted)
    out = {"n": int(m.size), "mape": mape(m, p), "rmspe": rmspe(m, p)}
    for band in ACCURACY_BANDS:
        out[f"acc{round(band * 100)}"] = accuracy_within(m, p, band)
    out["kendall_tau"] = kendall_tau(m, p)
    return out
