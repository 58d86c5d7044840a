"""Fit a predictor: cross-validate every candidate, refit the winner on all records, write a manifest."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import now
from compressor.elastic.search_space import DIMENSIONS
from predictors.calibration import anchor_from_records, anchors_from_records
from predictors.dataset import Dataset, to_dataset
from predictors.features import ANALYTIC, FEATURE_NAMES, FEATURE_SCHEMA, bytes_per_param, feature_matrix
from predictors.models import CANDIDATES, affine_spec, ratio_spec
from predictors.modelspace import space_from_description
from predictors.predictor import SCHEMA, LatencyPredictor, library_versions
from predictors.selection import SELECTION_METRIC, CVResult, arch_groups, cross_validate, select


@dataclass(frozen=True)
class FitConfig:
    """How to fit. ``candidates`` are names in :data:`predictors.models.CANDIDATES`."""

    folds: int = 5
    seed: int = 0
    candidates: tuple[str, ...] = tuple(CANDIDATES)
    p90: bool = True  # also fit the winner on stats_ms.p90 when every record has one
    # calibration anchors stored (predictors.calibration.anchors_from_records): 1 = the largest sub-network;
    # k > 1 adds mid-sized ones and calibration takes the median ratio. Measured in session 11 (README,
    # "Drift-proof predictions"): no better than one on that VM's noise, so one stays the default
    anchors: int = 1

    def __post_init__(self):
        unknown = [c for c in self.candidates if c not in CANDIDATES]
        if unknown or not self.candidates:
            raise NaspruneError(f"unknown model types {unknown}; choose from {', '.join(CANDIDATES)}")
        if self.folds < 2:
            raise NaspruneError(f"--folds must be >= 2, got {self.folds}")
        if isinstance(self.anchors, bool) or not isinstance(self.anchors, int) or self.anchors < 1:
            raise NaspruneError(f"--anchors must be an integer >= 1, got {self.anchors}")


@dataclass
class FitResult:
    predictor: LatencyPredictor
    dataset: Dataset
    cv: list[CVResult] = field(default_factory=list)

    @property
    def selected(self) -> CVResult:
        return next(r for r in self.cv if r.name == self.predictor.manifest["cv"]["selected"])


def training_ranges(ds: Dataset) -> dict:
    """Per-dimension and per-workload-kind [min, max]: the box outside which queries warn."""
    arch = {d: [min(getattr(s, d) for s in ds.subs), max(getattr(s, d) for s in ds.subs)] for d in DIMENSIONS}
    kinds: dict = {}
    for w in ds.workloads:
        k = kinds.setdefault(w.kind, {f: [getattr(w, f), getattr(w, f)] for f in ("batch", "seq", "new_tokens")})
        for f in k:
            k[f] = [min(k[f][0], getattr(w, f)), max(k[f][1], getattr(w, f))]
    return {"arch": arch, "workloads": kinds}


def _median_cv(records: list[dict]) -> float | None:
    """Median iteration-to-iteration coefficient of variation of the records (within-run timing noise)."""
    cvs = [float(r["stats_ms"]["cv"]) for r in records if r["stats_ms"].get("cv") is not None]
    return float(np.median(cvs)) if cvs else None


def fit_predictor(
    records: list[dict],
    model_description: dict,
    config: FitConfig = FitConfig(),
    reference: LatencyPredictor | None = None,
) -> FitResult:
    """Records of one group + the profiled model's description (:func:`predictors.modelspace.describe_model`).

    ``reference``: a predictor of the same device and engine at another precision (fp32, fitted on
    many sub-networks); adds the ``ratio-to-<precision>`` candidate (:class:`predictors.models.
    RatioToReference`), which cross-validation weighs against the direct ones like any other."""
    ds = to_dataset(records)
    space = space_from_description(model_description)
    for s in ds.subs:
        space.validate(s)
    X = feature_matrix(space, ds.subs, ds.workloads, ds.group.precision)
    groups = arch_groups(ds.subs)
    specs = [CANDIDATES[name] for name in config.candidates]
    ratio = None
    if reference is not None:
        ratio = _check_reference(reference, ds, space)
        specs.append(ratio_spec(reference.estimators["median"], ratio["column_scale"], ratio["name"]))
        specs.append(affine_spec(reference.estimators["median"], ratio["column_scale"], ratio["affine_name"]))
    cv = [cross_validate(spec, X, ds.median_ms, groups, config.folds, config.seed) for spec in specs]
    best = select(cv)
    spec = next(s for s in specs if s.name == best.name)
    estimators = {"median": spec.fit(X, ds.median_ms, config.seed)}
    if config.p90 and ds.p90_ms is not None:
        borrowed = {ratio["name"]: ratio_spec, ratio["affine_name"]: affine_spec} if ratio is not None else {}
        if spec.name not in borrowed:
            estimators["p90"] = spec.fit(X, ds.p90_ms, config.seed)
        elif "p90" in reference.estimators:
            p90 = borrowed[spec.name](reference.estimators["p90"], ratio["column_scale"], spec.name)
            estimators["p90"] = p90.fit(X, ds.p90_ms, config.seed)
    first = ds.records[0]
    manifest = {
        "schema": SCHEMA,
        "created_at": now(),
        "group": ds.group.to_dict(),
        "fingerprint": first.get("fingerprint", {}),
        "device": first.get("device"),
        "provider": first.get("provider"),
        "export_recipe": first.get("export_recipe", {}),
        "model": {**ds.model, **model_description},
        "versions": library_versions(),
        "features": {"schema": FEATURE_SCHEMA, "names": list(FEATURE_NAMES), "analytic": list(ANALYTIC)},
        "estimator": {"format": "skops", "selected": best.name, "quantiles": list(estimators)},
        "reference": None if ratio is None else {k: v for k, v in ratio.items() if k != "column_scale"},
        "training": {
            "n_records": len(ds),
            "n_subnetworks": int(len(np.unique(groups))),
            "workloads": dict(sorted(Counter(r["workload"] for r in ds.records).items())),
            "ranges": training_ranges(ds),
            "noise_cv_median": _median_cv(ds.records),
            "keys": ds.keys,
        },
        # re-measured at use time to cancel the machine's drift (predictors.calibration)
        "anchor": anchor_from_records(ds.records),
        # the first is "anchor"; calibration scales by the median of their ratios
        "anchors": anchors_from_records(ds.records, config.anchors),
        "cv": {
            "folds": config.folds,
            "grouped_by": "architecture",
            "metric": SELECTION_METRIC,
            "selected": best.name,
            "models": {r.name: r.metrics for r in cv},
            "config": asdict(config),
        },
    }
    return FitResult(LatencyPredictor(estimators, manifest, space), ds, cv)


def _check_reference(reference: LatencyPredictor, ds: Dataset, space) -> dict:
    """The reference must describe the same model on the same device and engine, at another precision."""
    mine, theirs = ds.group.to_dict(), reference.group
    here = _device_id(ds.records[0].get("fingerprint", {}))
    there = _device_id(reference.manifest.get("fingerprint", {}))
    for key, a, b in (("engine", mine["engine"], theirs["engine"]), ("device", here, there)):
        if str(a) != str(b):
            raise NaspruneError(
                f"the reference predictor is for {key} {b}, these records for {key} {a}; "
                "a ratio only transfers within one device and engine"
            )
    if theirs["precision"] == mine["precision"]:
        raise NaspruneError(f"the reference predictor has the same precision ({mine['precision']}); fit directly")
    if reference.space.num_params(reference.space.largest()) != space.num_params(space.largest()):
        raise NaspruneError("the reference predictor was fitted for another model; use one of the same model")
    scale = np.ones(len(FEATURE_NAMES))
    factor = bytes_per_param(theirs["precision"]) / bytes_per_param(mine["precision"])
    for column in ("weight_traffic_bytes", "weight_bytes"):  # the only features a precision changes
        scale[FEATURE_NAMES.index(column)] = factor
    return {
        "name": f"ratio-to-{theirs['precision']}",
        "affine_name": f"affine-to-{theirs['precision']}",
        "precision": theirs["precision"],
        "recipe_id": theirs.get("recipe_id"),
        "selected": reference.manifest["cv"]["selected"],
        "n_subnetworks": reference.manifest["training"]["n_subnetworks"],
        "column_scale": scale,
    }


def _device_id(fingerprint: dict) -> str:
    """The fingerprint id without the precision and recipe (a profile's ``fingerprint_id`` includes
    them, so fp32 and int8 records of one machine differ there but share this)."""
    from profilers.standalone import fingerprint_id

    return fingerprint_id({k: v for k, v in fingerprint.items() if k not in ("precision", "recipe_id")})
