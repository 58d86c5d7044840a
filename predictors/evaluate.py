"""Score a fitted predictor on profile records it was not fitted on."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.core.workload import Workload
from compressor.elastic.search_space import SubNetwork
from predictors.dataset import GROUP_FIELDS, groups_of
from predictors.metrics import summarize
from predictors.predictor import LatencyPredictor


@dataclass
class Evaluation:
    """Per-record measured/predicted values plus metrics overall and per workload."""

    keys: list[str]
    workloads: list[str]
    measured_ms: np.ndarray
    predicted_ms: np.ndarray
    overall: dict
    per_workload: dict[str, dict]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "per_workload": self.per_workload,
            "warnings": self.warnings,
            "records": [
                {"key": k, "workload": w, "measured_ms": float(m), "predicted_ms": float(p)}
                for k, w, m, p in zip(self.keys, self.workloads, self.measured_ms, self.predicted_ms)
            ],
        }


def held_out(predictor: LatencyPredictor, records: list[dict]) -> list[dict]:
    """Records of the predictor's group and model that were not used to fit it."""
    group = predictor.group
    mine = [r for r in records if all(str(r.get(f)) == str(group[f]) for f in GROUP_FIELDS)]
    if not mine:
        have = "; ".join(str(g) for g in groups_of(records)) or "nothing"
        raise NaspruneError(
            f"the store has no records for this predictor's group ({', '.join(f'{k}={v}' for k, v in group.items())}); "
            f"it holds: {have}"
        )
    sha = predictor.manifest["model"].get("sha256")
    other_model = [r for r in mine if r["model"].get("sha256") != sha]
    if other_model:
        raise NaspruneError(
            f"{len(other_model)} records were profiled on another model than the predictor's "
            f"({str(sha)[:12]}); evaluate on a store of the same model"
        )
    used = set(predictor.manifest["training"]["keys"])
    fresh = [r for r in mine if r["key"] not in used]
    if not fresh:
        raise NaspruneError(
            f"all {len(mine)} matching records were used to fit the predictor; profile other "
            "sub-networks (e.g. another --seed) into the store and evaluate again"
        )
    return fresh


def evaluate(predictor: LatencyPredictor, records: list[dict]) -> Evaluation:
    """Predict every held-out record (batched per workload) and score it."""
    fresh = sorted(held_out(predictor, records), key=lambda r: r["key"])
    by_workload: dict[str, list[dict]] = {}
    for r in fresh:
        by_workload.setdefault(r["workload"], []).append(r)
    keys, wls, measured, predicted, per, caught = [], [], [], [], {}, []
    for w, rs in sorted(by_workload.items()):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            pred = predictor.predict_ms([SubNetwork.from_dict(r["arch"]) for r in rs], Workload.parse(w))
        caught += [f"{w}: {g.message}" for g in got]
        meas = np.array([float(r["stats_ms"]["median"]) for r in rs])
        per[w] = summarize(meas, pred)
        keys += [r["key"] for r in rs]
        wls += [w] * len(rs)
        measured.append(meas)
        predicted.append(pred)
    m, p = np.concatenate(measured), np.concatenate(predicted)
    return Evaluation(keys, wls, m, p, summarize(m, p), per, caught)
