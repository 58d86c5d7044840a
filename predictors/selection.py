"""Model selection by K-fold cross-validation on relative error.

Folds are grouped by *architecture*: all workloads of one sub-network fall in the same fold.
Otherwise a sub-network's prefill:1x128 row would be in training while its prefill:1x256 row is
scored, and the CV error would flatter the predictor compared with what the search stage asks of
it (latency of sub-networks never profiled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold

from compressor.core.errors import NaspruneError
from predictors.metrics import summarize
from predictors.models import ModelSpec

SELECTION_METRIC = "mape"


@dataclass
class CVResult:
    """Out-of-fold predictions and their metrics for one candidate."""

    name: str
    oof_ms: np.ndarray
    metrics: dict


def arch_groups(subs) -> np.ndarray:
    """One integer label per distinct architecture (the CV grouping)."""
    labels: dict = {}
    return np.array([labels.setdefault(s, len(labels)) for s in subs])


def cross_validate(
    spec: ModelSpec, X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int
) -> CVResult:
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise NaspruneError(f"cross-validation needs at least 2 profiled sub-networks, got {n_groups}; profile more")
    oof = np.empty_like(y)
    for train, test in GroupKFold(n_splits=min(folds, n_groups)).split(X, y, groups):
        oof[test] = spec.fit(X[train], y[train], seed).predict(X[test])
    return CVResult(spec.name, oof, summarize(y, oof))


def select(results: list[CVResult]) -> CVResult:
    """Lowest cross-validated MAPE wins (ties: the first candidate, i.e. the simplest)."""
    return min(results, key=lambda r: r.metrics[SELECTION_METRIC])
