"""The candidate estimators. Every one is a plain scikit-learn Pipeline, so skops can persist it.

All three are fitted to *relative* error, because that is what they are selected and judged on:

* ``linear``: non-negative least squares on the additive cost terms of
  :data:`predictors.features.ANALYTIC`, weighted by 1/latency² (so the squared loss is the
  squared relative error). Non-negative because no cost term can make a model faster; this keeps
  the fit physical and lets it extrapolate sensibly a little past the training range.
* ``gbrt`` and ``random_forest``: tree ensembles on every feature with a log-latency target
  (``TransformedTargetRegressor``): an additive error in log space is a relative error. Trees
  capture effects the formulas miss but cannot extrapolate (they predict a constant beyond the
  last split), which is why predictors warn outside the training ranges.

One more candidate exists only when a *reference* predictor is given (:class:`RatioToReference`,
``ratio-to-fp32``): a quantized precision is profiled on a few sub-networks (quantizing a graph
costs tens of seconds), too few to fit the cost terms, but its latency is mostly the fp32
latency of the same sub-network times a ratio the recipe sets; :class:`AffineToReference`
(``affine-to-fp32``) adds an intercept for the share a recipe keeps in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.compose import ColumnTransformer, TransformedTargetRegressor
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler

from predictors.features import FEATURE_NAMES, analytic_columns


@dataclass(frozen=True)
class ModelSpec:
    """How to build one candidate and how to weight its samples."""

    name: str
    build: Callable[[int], RegressorMixin]
    relative_weights: bool  # pass 1/y^2 as sample weights (squared loss -> squared relative error)

    def fit(self, X: np.ndarray, y: np.ndarray, seed: int) -> RegressorMixin:
        estimator = self.build(seed)
        if self.relative_weights:
            estimator.fit(X, y, reg__sample_weight=1.0 / np.square(y))
        else:
            estimator.fit(X, y)
        return estimator


def _linear(seed: int) -> Pipeline:
    return Pipeline(
        [
            ("analytic", ColumnTransformer([("terms", "passthrough", analytic_columns())])),
            # no centring: NNLS coefficients must stay per-unit costs of each term
            ("scale", MaxAbsScaler()),
            # no intercept: the `graph_runs` term is the (non-negative) fixed cost per graph run
            ("reg", LinearRegression(positive=True, fit_intercept=False)),
        ]
    )


def _log_target(regressor) -> TransformedTargetRegressor:
    return TransformedTargetRegressor(regressor=Pipeline([("reg", regressor)]), func=np.log, inverse_func=np.exp)


def _gbrt(seed: int) -> TransformedTargetRegressor:
    return _log_target(
        GradientBoostingRegressor(n_estimators=400, learning_rate=0.05, max_depth=3, subsample=0.8, random_state=seed)
    )


def _random_forest(seed: int) -> TransformedTargetRegressor:
    return _log_target(
        RandomForestRegressor(n_estimators=300, min_samples_leaf=1, max_features=0.6, n_jobs=1, random_state=seed)
    )


CANDIDATES: dict[str, ModelSpec] = {
    "linear": ModelSpec("linear", _linear, relative_weights=True),
    "gbrt": ModelSpec("gbrt", _gbrt, relative_weights=False),
    "random_forest": ModelSpec("random_forest", _random_forest, relative_weights=False),
}


KIND_COLUMNS = tuple(FEATURE_NAMES.index(f"is_{k}") for k in ("prefill", "decode", "generate"))


class RatioToReference(RegressorMixin, BaseEstimator):
    """Latency = a reference estimator's latency x a ratio per workload kind (geometric mean).

    ``reference``: a fitted estimator of the same device and engine at another precision (fp32),
    fitted on many sub-networks; ``column_scale``: per-feature factors that turn this precision's
    feature rows into the reference's (the byte-width columns; every other feature is shared).
    Fitting estimates one log-ratio per workload kind present (prefill / decode / generate) from
    this precision's records: 1-3 numbers, so four profiled sub-networks pin it down where the cost
    terms of ``linear`` (eight) cannot be. What it cannot see is a ratio that changes with shape
    (e.g. an fp32 LM head weighing more in narrow sub-networks); cross-validation against the
    direct candidates decides whether that matters for the records at hand.
    """

    def __init__(self, reference=None, column_scale=None):
        self.reference = reference
        self.column_scale = column_scale

    def _reference_ms(self, X: np.ndarray) -> np.ndarray:
        scale = np.ones(X.shape[1]) if self.column_scale is None else np.asarray(self.column_scale)
        return np.asarray(self.reference.predict(X * scale), dtype=np.float64)

    @staticmethod
    def _kinds(X: np.ndarray) -> np.ndarray:
        return np.argmax(X[:, list(KIND_COLUMNS)], axis=1)

    def fit(self, X: np.ndarray, y: np.ndarray):
        log_ratio = np.log(np.asarray(y, dtype=np.float64) / self._reference_ms(X))
        kinds = self._kinds(X)
        self.overall_ = float(np.mean(log_ratio))
        self.log_ratio_ = np.array(
            [float(np.mean(log_ratio[kinds == k])) if np.any(kinds == k) else self.overall_ for k in range(3)]
        )
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._reference_ms(X) * np.exp(self.log_ratio_[self._kinds(X)])


ARCH_COLUMNS = tuple(FEATURE_NAMES.index(f) for f in ("embed_dim", "num_heads", "ffn_dim", "num_layers"))


class AffineToReference(RatioToReference):
    """Latency = a + b x the reference estimator's latency, per workload kind (least squares).

    Why: a quantized graph keeps some work in fp32 (the LM head, norms, attention's softmax; for
    ``int8-mixed`` the down-projections), a larger share of small sub-networks, so its ratio to fp32
    changes with size. Measured on the demo's 4 ``int8-mixed`` profiles: 0.65 for the 50M ones, 0.52
    for the largest, so one geometric-mean ratio predicted the original 16 % too slow. An intercept
    (the fixed share) captures that with one more number per kind. A kind with fewer than two
    distinct profiled sub-networks, or whose fit would not rise with the reference, keeps the ratio;
    predictions never fall below a tenth of the ratio's (no negative latency far below the fitted sizes).
    """

    def fit(self, X: np.ndarray, y: np.ndarray):
        super().fit(X, y)
        ref, y = self._reference_ms(X), np.asarray(y, dtype=np.float64)
        kinds = self._kinds(X)
        self.intercept_ = np.zeros(3)
        self.slope_ = np.exp(self.log_ratio_)
        for k in range(3):
            rows = kinds == k
            if len(np.unique(X[rows][:, list(ARCH_COLUMNS)], axis=0)) < 2 or np.ptp(ref[rows]) <= 0:
                continue
            slope, intercept = np.polyfit(ref[rows], y[rows], 1)
            if slope > 0:
                self.slope_[k], self.intercept_[k] = float(slope), float(intercept)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        ref, kinds = self._reference_ms(X), self._kinds(X)
        affine = self.intercept_[kinds] + self.slope_[kinds] * ref
        return np.maximum(affine, 0.1 * ref * np.exp(self.log_ratio_[kinds]))


def ratio_spec(reference, column_scale: np.ndarray, name: str) -> ModelSpec:
    """The :class:`RatioToReference` candidate over ``reference`` (a fitted estimator)."""
    return ModelSpec(name, lambda seed: RatioToReference(reference, column_scale), relative_weights=False)


def affine_spec(reference, column_scale: np.ndarray, name: str) -> ModelSpec:
    """The :class:`AffineToReference` candidate over ``reference`` (a fitted estimator)."""
    return ModelSpec(name, lambda seed: AffineToReference(reference, column_scale), relative_weights=False)
