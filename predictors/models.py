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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.base import RegressorMixin
from sklearn.compose import ColumnTransformer, TransformedTargetRegressor
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler

from predictors.features import analytic_columns


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
