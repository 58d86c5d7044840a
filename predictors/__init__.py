"""nasprune latency predictors: scikit-learn models of measured sub-network latency, one per device setup.

The search stage uses :func:`load_predictor` and :meth:`LatencyPredictor.predict_ms`.
"""

from predictors.predictor import ExtrapolationWarning, LatencyPredictor, load_predictor

__all__ = ["ExtrapolationWarning", "LatencyPredictor", "load_predictor"]
