"""A fitted latency predictor: estimators + manifest, saved as a directory, guarded on load.

Directory layout::

    DIR/manifest.json     what the predictor is valid for, how it was fitted, how well it did
    DIR/estimator.skops   {"median": Pipeline, "p90": Pipeline (optional)} in skops format

skops, not pickle/joblib: a predictor is a file people exchange (one per device), and loading a
pickle from a stranger runs arbitrary code. skops only builds the types we allow
(:data:`ALLOWED_TYPE_PREFIXES`, and nasprune's own :data:`ALLOWED_TYPES`); anything else in the
file is refused before loading.
"""

from __future__ import annotations

import json
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.core.hashing import sha256_file
from compressor.core.workload import Workload
from compressor.elastic.search_space import DIMENSIONS, SearchSpace, SubNetwork
from predictors.dataset import GROUP_FIELDS, GROUP_FLAGS
from predictors.features import FEATURE_NAMES, FEATURE_SCHEMA, feature_matrix
from predictors.modelspace import space_from_description

MANIFEST = "manifest.json"
ESTIMATOR = "estimator.skops"
SCHEMA = "nasprune-predictor/1"
ALLOWED_TYPE_PREFIXES = ("sklearn.",)
# nasprune's own estimator (a reference estimator x per-kind ratios): plain attributes, no code to run
ALLOWED_TYPES = ("predictors.models.RatioToReference", "predictors.models.AffineToReference")


class ExtrapolationWarning(UserWarning):
    """A query lies outside the ranges the predictor was fitted on (tree models cannot extrapolate)."""


def library_versions() -> dict[str, str]:
    import scipy
    import sklearn
    import skops

    from compressor import __version__

    return {
        "nasprune": __version__,
        "scikit-learn": sklearn.__version__,
        "skops": skops.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


@dataclass
class LatencyPredictor:
    """Predicts median (and p90) latency in ms of sub-networks for one device/engine/precision/recipe."""

    estimators: dict
    manifest: dict
    space: SearchSpace
    strict: bool = False

    # ---- queries ---------------------------------------------------------------------------
    def predict_ms(self, subs: Sequence[SubNetwork], workload: Workload, quantile: str = "median") -> np.ndarray:
        """Latency in ms, one per sub-network. Out-of-range queries warn (``strict``: raise)."""
        if quantile not in self.estimators:
            raise NaspruneError(
                f"this predictor has no '{quantile}' model (has: {', '.join(self.estimators)}); "
                "p90 needs records with stats_ms.p90"
            )
        subs = list(subs)
        if not subs:
            return np.zeros(0)
        for s in subs:
            self.space.validate(s)
        self._guard_ranges(subs, workload)
        X = feature_matrix(self.space, subs, workload, self.group["precision"])
        return np.asarray(self.estimators[quantile].predict(X), dtype=np.float64)

    @property
    def group(self) -> dict:
        return self.manifest["group"]

    def check_compatible(
        self,
        fingerprint_id: str | None = None,
        engine: str | None = None,
        precision: str | None = None,
        recipe_id: str | None = None,
    ) -> None:
        """Raise when this predictor was fitted for another device/engine/precision/recipe.

        ``None`` skips that field (e.g. a caller that does not know the export recipe yet).
        """
        asked = {"fingerprint_id": fingerprint_id, "engine": engine, "precision": precision, "recipe_id": recipe_id}
        wrong = [f for f, v in asked.items() if v is not None and str(v) != str(self.group[f])]
        if wrong:
            have = ", ".join(f"{f}={self.group[f]}" for f in wrong)
            want = ", ".join(f"{f}={asked[f]}" for f in wrong)
            flags = " ".join(f"{GROUP_FLAGS[f]} {asked[f]}" for f in wrong)
            raise NaspruneError(
                f"predictor is for {have}, not {want}; fit one from records of this setup "
                f"(nasprune predictor fit --store PATH {flags} --out DIR)"
            )

    def out_of_range(self, subs: Sequence[SubNetwork], workload: Workload) -> list[str]:
        """Human-readable reasons why queries fall outside the training ranges (empty: all inside)."""
        ranges = self.manifest["training"]["ranges"]
        kinds = ranges["workloads"]
        if workload.kind not in kinds:
            raise NaspruneError(
                f"predictor was fitted on {', '.join(sorted(kinds))} workloads only, not "
                f"{workload.kind}; profile {workload} and re-fit"
            )
        reasons = []
        for dim in DIMENSIONS:
            lo, hi = ranges["arch"][dim]
            values = [getattr(s, dim) for s in subs]
            if min(values) < lo or max(values) > hi:
                reasons.append(f"{dim} {min(values)}..{max(values)} outside trained {lo}..{hi}")
        for field in ("batch", "seq", "new_tokens"):
            lo, hi = kinds[workload.kind][field]
            value = getattr(workload, field)
            if not lo <= value <= hi:
                reasons.append(f"{workload.kind} {field}={value} outside trained {lo}..{hi}")
        return reasons

    def _guard_ranges(self, subs, workload) -> None:
        reasons = self.out_of_range(subs, workload)
        if not reasons:
            return
        text = "query outside the predictor's training ranges (" + "; ".join(reasons) + ")"
        if self.strict:
            raise NaspruneError(text + "; profile such sub-networks/workloads and re-fit, or drop --strict")
        warnings.warn(text + "; the prediction is an extrapolation", ExtrapolationWarning, stacklevel=3)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: Path, overwrite: bool = False) -> Path:
        """Write the predictor directory atomically (readers never see half a predictor)."""
        import skops.io as sio

        from compressor.elastic.modeldir import atomic_dir_write, write_json_atomic

        def write(tmp: Path):
            sio.dump(self.estimators, tmp / ESTIMATOR)
            manifest = dict(self.manifest)
            manifest["estimator"] = {**manifest["estimator"], "file": ESTIMATOR, "sha256": _sha256(tmp / ESTIMATOR)}
            write_json_atomic(tmp / MANIFEST, manifest)
            self.manifest = manifest

        return atomic_dir_write(Path(directory), write, "predictor", overwrite)


def _sha256(path: Path) -> str:
    return sha256_file(path)


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise NaspruneError(
            f"{directory} is not a predictor directory (no {MANIFEST}); create one with "
            "'nasprune predictor fit --store PATH --out DIR'"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NaspruneError(f"{path} is corrupt ({e.msg}); re-fit the predictor") from None
    if manifest.get("schema") != SCHEMA:
        raise NaspruneError(
            f"{path} has schema {manifest.get('schema')!r}, expected {SCHEMA!r}; "
            "re-fit the predictor with this nasprune"
        )
    if manifest.get("features", {}).get("schema") != FEATURE_SCHEMA or manifest["features"].get("names") != list(
        FEATURE_NAMES
    ):
        raise NaspruneError(
            f"{directory} was fitted on feature schema {manifest.get('features', {}).get('schema')!r}, "
            f"this nasprune computes {FEATURE_SCHEMA!r}; re-fit the predictor"
        )
    return manifest


def _check_versions(manifest: dict, strict: bool, directory: Path) -> None:
    """scikit-learn estimators are only guaranteed to behave identically in the same minor version."""
    fitted = manifest["versions"].get("scikit-learn", "?")
    here = library_versions()["scikit-learn"]
    if _minor(fitted) == _minor(here):
        return
    text = f"{directory} was fitted with scikit-learn {fitted}, this is {here}"
    if strict:
        raise NaspruneError(text + f"; re-fit the predictor, or install scikit-learn=={fitted}")
    warnings.warn(text + "; predictions may differ slightly (re-fit to be sure)", UserWarning, stacklevel=3)


def _load_estimators(directory: Path, manifest: dict) -> dict:
    import skops.io as sio

    path = Path(directory) / manifest["estimator"]["file"]
    if not path.is_file():
        raise NaspruneError(f"{path} is missing; the predictor directory is incomplete, re-fit it")
    if _sha256(path) != manifest["estimator"].get("sha256"):
        raise NaspruneError(f"{path} does not match the sha256 in {MANIFEST}; the predictor was modified, re-fit it")
    untrusted = sio.get_untrusted_types(file=path)
    foreign = [t for t in untrusted if not t.startswith(ALLOWED_TYPE_PREFIXES) and t not in ALLOWED_TYPES]
    if foreign:
        raise NaspruneError(f"{path} contains types outside scikit-learn ({', '.join(foreign)}); refusing to load it")
    return sio.load(path, trusted=untrusted)


def load_predictor(directory: Path | str, strict: bool = False) -> LatencyPredictor:
    """Load and check a predictor directory.

    Refused: wrong manifest/feature schema, an estimator file that does not match its hash or
    holds non-scikit-learn types. A scikit-learn minor-version change warns (``strict``: refused).
    ``strict`` also turns out-of-range queries from warnings into errors.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_versions(manifest, strict, directory)
    estimators = _load_estimators(directory, manifest)
    missing = [f for f in GROUP_FIELDS if f not in manifest.get("group", {})]
    if missing:
        raise NaspruneError(f"{directory}/{MANIFEST} lacks group fields {missing}; re-fit the predictor")
    return LatencyPredictor(estimators, manifest, space_from_description(manifest["model"]), strict)
