"""Predicted latency of a workload mix (:class:`compressor.core.workload.WorkloadMix`) from one predictor.

A predictor is fitted on profile records of several workloads (the workload is a feature), so the
latency of a mix is the weighted sum of its per-workload predictions: for ``prefill:1x512 +
128*decode:1x512`` one request's end-to-end time, for ``0.3*A + 0.7*B`` a traffic mix's mean.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.core.workload import Workload, WorkloadMix
from compressor.elastic.search_space import SubNetwork
from predictors.predictor import ExtrapolationWarning


def predict_mix_ms(predictor, subs: Sequence[SubNetwork], mix, quantile: str = "median") -> np.ndarray:
    """sum(weight x predictor.predict_ms(subs, workload)) over the mix's terms, one value per sub-network.

    ``mix``: a :class:`WorkloadMix`, a :class:`Workload` or mix text. A plain workload is exactly
    ``predict_ms`` (weight 1)."""
    subs = list(subs)
    return WorkloadMix.of(mix).expected(
        lambda w: np.asarray(predictor.predict_ms(subs, w, quantile=quantile), dtype=np.float64)
    )


def workload_out_of_range(predictor, workload: Workload) -> list[str]:
    """Why ``workload`` lies outside the batch/length ranges the predictor was fitted on (empty: inside).

    Raises when the predictor never saw the workload's kind: no record of it at all, nothing to
    interpolate from."""
    kinds = predictor.manifest["training"]["ranges"]["workloads"]
    if workload.kind not in kinds:
        raise NaspruneError(
            f"predictor was fitted on {', '.join(sorted(kinds))} workloads only, not {workload.kind} "
            f"({workload}); profile {workload} and re-fit"
        )
    reasons = []
    for field in ("batch", "seq", "new_tokens"):
        lo, hi = kinds[workload.kind][field]
        value = getattr(workload, field)
        if not lo <= value <= hi:
            reasons.append(f"{workload} {field}={value} outside trained {lo}..{hi}")
    return reasons


def check_mix(predictors: Iterable, mix, strict: bool = False) -> list[str]:
    """Check every term of ``mix`` against every predictor before a search spends minutes on it.

    A kind a predictor was never fitted on is refused; a batch/length outside the fitted range
    warns once, in one line (``strict``: refused). Returns the reasons (empty: all inside)."""
    mix = WorkloadMix.of(mix)
    reasons: list[str] = []
    for predictor in predictors:
        precision = predictor.group.get("precision", "?")
        for w in mix.workloads:
            reasons += [f"{precision} predictor: {r}" for r in workload_out_of_range(predictor, w)]
    if reasons:
        text = f"workload mix '{mix}' outside the predictors' fitted workloads ({'; '.join(reasons)})"
        if strict:
            raise NaspruneError(text + "; profile those workloads and re-fit, or drop --strict")
        warnings.warn(text + "; its latency is an extrapolation", ExtrapolationWarning, stacklevel=2)
    return reasons


def mix_out_of_range(predictor, subs: Sequence[SubNetwork], mix) -> list[str]:
    """:meth:`LatencyPredictor.out_of_range` over every term of the mix (each reason once)."""
    subs = list(subs)
    return list(dict.fromkeys(r for w in WorkloadMix.of(mix).workloads for r in predictor.out_of_range(subs, w)))
