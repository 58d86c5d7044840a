"""Profile records -> a training set for one predictor group.

A latency predictor is only valid for one (device fingerprint, engine, precision, export recipe):
the same sub-network runs at different speeds on another CPU, engine, dtype or graph recipe. A
store may hold many such groups, so :func:`select_group` either finds exactly one or fails with
the list of groups and the flags that pick one. Records of different models in one group are
refused too: the features need the model's search space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.core.workload import Workload
from compressor.elastic.search_space import SubNetwork

GROUP_FIELDS = ("fingerprint_id", "engine", "precision", "recipe_id")
# CLI flag for each group field, named in error messages
GROUP_FLAGS = {
    "fingerprint_id": "--fingerprint",
    "engine": "--engine",
    "precision": "--precision",
    "recipe_id": "--recipe",
}


@dataclass(frozen=True)
class Group:
    """What one predictor is valid for."""

    fingerprint_id: str
    engine: str
    precision: str
    recipe_id: str

    @staticmethod
    def of(record: dict) -> Group:
        return Group(*(str(record[f]) for f in GROUP_FIELDS))

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in GROUP_FIELDS}

    def __str__(self) -> str:
        return (
            f"fingerprint={self.fingerprint_id} engine={self.engine} precision={self.precision} recipe={self.recipe_id}"
        )


@dataclass
class Dataset:
    """Parallel arrays over the records of one group (one row per record)."""

    group: Group
    records: list[dict]
    subs: list[SubNetwork]
    workloads: list[Workload]
    median_ms: np.ndarray
    p90_ms: np.ndarray | None  # None when any record lacks a p90

    @property
    def keys(self) -> list[str]:
        return [r["key"] for r in self.records]

    @property
    def model(self) -> dict:
        return self.records[0]["model"]

    def __len__(self) -> int:
        return len(self.records)


def read_store(path: Path, **filters) -> list[dict]:
    """All records of the profile store at ``path`` matching the top-level ``filters``."""
    path = Path(path)
    if not path.exists():
        raise NaspruneError(
            f"profile store {path} does not exist; create it with 'nasprune profile ... --store {path}'"
        )
    from profilers.store import ProfileStore

    return ProfileStore(path).records(**{k: v for k, v in filters.items() if v is not None})


def _check_record(r: dict) -> None:
    from profilers.records import validate_record

    validate_record(r)


def groups_of(records: list[dict]) -> dict[Group, int]:
    """Number of records per predictor group."""
    out: dict[Group, int] = {}
    for r in records:
        _check_record(r)
        g = Group.of(r)
        out[g] = out.get(g, 0) + 1
    return out


def select_group(records: list[dict], **wanted: str | None) -> list[dict]:
    """The records of the one group matching ``wanted`` (fingerprint_id/engine/precision/recipe_id)."""
    unknown = set(wanted) - set(GROUP_FIELDS)
    if unknown:
        raise ValueError(f"unknown group fields {sorted(unknown)}")
    if not records:
        raise NaspruneError("the profile store holds no records; profile sub-networks first ('nasprune profile ...')")
    matching = [r for r in records if all(v is None or str(r.get(f)) == str(v) for f, v in wanted.items())]
    groups = groups_of(matching)
    if len(groups) == 1:
        return matching
    listing = "; ".join(f"{g} ({n} records)" for g, n in sorted(groups_of(records).items(), key=lambda gn: str(gn[0])))
    flags = " ".join(f"{flag} ..." for flag in GROUP_FLAGS.values())
    if not groups:
        raise NaspruneError(f"no profile records match {_describe(wanted)}; the store holds: {listing}")
    raise NaspruneError(
        f"the profile store holds {len(groups)} predictor groups (one predictor each); pick one with {flags}: {listing}"
    )


def _describe(wanted: dict) -> str:
    chosen = [f"{GROUP_FLAGS[f]} {v}" for f, v in wanted.items() if v is not None]
    return " ".join(chosen) if chosen else "(no selection)"


def to_dataset(records: list[dict]) -> Dataset:
    """Records of exactly one group and one model -> arrays. Fails on mixed groups or models."""
    groups = groups_of(records)
    if len(groups) != 1:
        select_group(records)  # raises the listing error
    models = {(r["model"].get("source"), r["model"].get("sha256")) for r in records}
    if len(models) > 1:
        shown = ", ".join(f"{src} ({str(sha)[:12]})" for src, sha in sorted(models, key=str))
        raise NaspruneError(
            f"the selected records come from {len(models)} different models ({shown}); "
            "profile one model per store, or filter the store by model"
        )
    records = sorted(records, key=lambda r: r["key"])
    subs = [SubNetwork.from_dict(r["arch"]) for r in records]
    workloads = [Workload.parse(r["workload"]) for r in records]
    median = np.array([float(r["stats_ms"]["median"]) for r in records])
    if np.any(~np.isfinite(median)) or np.any(median <= 0):
        raise NaspruneError("some profile records have a non-positive or missing median latency; re-profile them")
    p90_values = [r["stats_ms"].get("p90") for r in records]
    p90 = np.array([float(v) for v in p90_values]) if all(v is not None for v in p90_values) else None
    return Dataset(next(iter(groups)), records, subs, workloads, median, p90)


def latency_ratios(records: list[dict], reference: str = "fp32") -> dict[str, dict]:
    """Per precision other than ``reference``: its measured latency / the reference's on the same
    (sub-network, workload) pairs, {"median": ..., "pairs": n}. Only pairs measured at both count.

    Whether a quantization recipe is faster is a property of the host (dynamic INT8 was 0.36x of
    fp32's prefill on a VNNI CPU and 1.04x on an AVX2-only one), so the search asks the profiles,
    not the recipe's reputation.
    """
    import statistics

    by_pair: dict[tuple, dict[str, float]] = {}
    for r in records:
        pair = (tuple(sorted(r["arch"].items())), r["workload"])
        by_pair.setdefault(pair, {})[r["precision"]] = float(r["stats_ms"]["median"])
    ratios: dict[str, list[float]] = {}
    for ms in by_pair.values():
        if reference in ms:
            for precision, value in ms.items():
                if precision != reference:
                    ratios.setdefault(precision, []).append(value / ms[reference])
    return {p: {"median": statistics.median(v), "pairs": len(v)} for p, v in ratios.items()}
