"""Adaptive profiling (nn-Meter style): profile more where the predictor is worst.

Uniform sampling spends most profiling time where the predictor is already good. Instead, each
round fits the predictor with cross-validation, ranks the profiled sub-networks by their
out-of-fold relative error, and profiles unprofiled *neighbours* of the worst ones (one gene one
step away: the regions of the space whose latency the model has not captured yet). It stops when
the cross-validated accuracy meets the target or the time budget is spent. Every measurement
goes to the profile store first, so an interrupted run resumes by running the same command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.elastic.search_space import SearchSpace, SubNetwork
from compressor.recovery.sampling import GridParamsSampler
from predictors.dataset import Group, groups_of, select_group, to_dataset
from predictors.fit import FitConfig, FitResult, fit_predictor
from predictors.modelspace import space_from_description

# (sub-networks, workload strings) -> the new profile records (already written to the store)
ProfileFn = Callable[[list[SubNetwork], list[str]], list[dict]]


@dataclass(frozen=True)
class AdaptiveConfig:
    """Stopping rule and round size. ``workloads`` empty: the workloads already in the store."""

    target_acc10: float = 0.97
    target_mape: float = 4.0
    budget_s: float = 1800.0
    batch: int = 8
    initial: int = 24  # sub-networks profiled first when the store has none of this group
    workloads: tuple[str, ...] = ()
    threads: int | None = None
    engine: str | None = None
    precision: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.batch < 1 or self.initial < 2:
            raise NaspruneError("--batch must be >= 1 and the initial sample >= 2 sub-networks")


def worst_subnetworks(result: FitResult) -> list[SubNetwork]:
    """Profiled sub-networks, worst cross-validated relative error (over their workloads) first."""
    ds, oof = result.dataset, result.selected.oof_ms
    err = np.abs(oof - ds.median_ms) / ds.median_ms
    worst: dict[SubNetwork, float] = {}
    for s, e in zip(ds.subs, err):
        worst[s] = max(worst.get(s, 0.0), float(e))
    return sorted(worst, key=lambda s: -worst[s])


def neighbours(space: SearchSpace, sub: SubNetwork) -> list[SubNetwork]:
    """Sub-networks one gene one step away from ``sub``."""
    genes = space.encode(sub)
    upper = space.gene_upper_bounds()
    out = []
    for i in range(len(genes)):
        for step in (-1, 1):
            g = list(genes)
            g[i] += step
            if 0 <= g[i] <= upper[i]:
                out.append(space.decode(g))
    return out


def next_batch(space: SearchSpace, result: FitResult, n: int, rng: np.random.Generator) -> list[SubNetwork]:
    """Up to ``n`` unprofiled neighbours of the worst-predicted sub-networks (random when exhausted)."""
    done = set(result.dataset.subs)
    chosen: list[SubNetwork] = []
    for worst in worst_subnetworks(result):
        fresh = [s for s in neighbours(space, worst) if s not in done and s not in chosen]
        if fresh:
            chosen.append(fresh[int(rng.integers(len(fresh)))])
        if len(chosen) == n:
            return chosen
    remaining = [s for s in space.enumerate() if s not in done and s not in chosen]
    picks = rng.permutation(len(remaining))[: n - len(chosen)]
    return chosen + [remaining[i] for i in picks]


def met(result: FitResult, cfg: AdaptiveConfig) -> bool:
    m = result.selected.metrics
    return m["acc10"] >= cfg.target_acc10 and m["mape"] <= cfg.target_mape


def run_adaptive(
    description: dict,
    store,
    profile: ProfileFn,
    fit_config: FitConfig,
    cfg: AdaptiveConfig,
    wanted: dict,
    log: Callable[[str], None] = print,
) -> FitResult:
    """The loop, independent of how sub-networks are profiled (``profile`` writes to ``store``)."""
    space = space_from_description(description)
    rng = np.random.default_rng(cfg.seed)
    start = time.monotonic()
    records = _group_records(store, wanted)
    workloads = list(cfg.workloads) or sorted({r["workload"] for r in records})
    if not workloads:
        raise NaspruneError(
            "the store has no records to learn the workloads from; pass --workloads (e.g. prefill:1x128,decode:1x256)"
        )
    if not records:
        first = GridParamsSampler(space, seed=cfg.seed).sample_many(cfg.initial)
        log(f"adaptive: store empty for this setup; profiling {len(set(first))} sub-networks spread over params")
        new = profile(sorted(set(first)), workloads)
        wanted = {**Group.of(new[0]).to_dict()} if new else wanted
        records = _group_records(store, wanted)
    seconds_per_sub = None
    while True:
        result = fit_predictor(records, description, fit_config)
        m = result.selected.metrics
        elapsed = time.monotonic() - start
        log(
            f"adaptive: {result.predictor.manifest['training']['n_subnetworks']} sub-networks, {result.selected.name} "
            f"CV MAPE {m['mape']:.2f}% ±10% {m['acc10']:.1%} after {elapsed / 60:.1f} min"
        )
        if met(result, cfg):
            log("adaptive: target reached")
            return result
        left = cfg.budget_s - elapsed
        n = cfg.batch if seconds_per_sub is None else min(cfg.batch, int(left // seconds_per_sub))
        if left <= 0 or n < 1:
            log("adaptive: time budget spent before the target; the predictor is the best so far")
            return result
        batch = next_batch(space, result, n, rng)
        if not batch:
            log("adaptive: every sub-network of the space is profiled")
            return result
        t0 = time.monotonic()
        profile(batch, [w for w in workloads])
        seconds_per_sub = (time.monotonic() - t0) / len(batch)
        records = _group_records(store, wanted)


def _group_records(store, wanted: dict) -> list[dict]:
    records = store.records(**{k: v for k, v in wanted.items() if v is not None})
    if records and len(groups_of(records)) > 1:
        records = select_group(records, **wanted)  # raises: several groups, user must pick
    if records:
        to_dataset(records)  # fails early on mixed models
    return records


def adaptive_fit(
    model: str,
    store_path: Path,
    fit_config: FitConfig,
    cfg: AdaptiveConfig,
    wanted: dict,
    online: bool = False,
    log: Callable[[str], None] = print,
) -> FitResult:
    """``nasprune predictor fit --adaptive MODEL``: profile MODEL's sub-networks with the profiler."""
    from compressor.elastic.modeldir import load_model
    from profilers.api import profile_subnetworks
    from profilers.store import ProfileStore

    loaded = load_model(model, online=online)
    description = {
        "hf_config": loaded.model.config.to_dict(),
        "space_config": dict(loaded.meta.search_space or {}),
        "layer_ranking": loaded.meta.layer_ranking,
    }
    store = ProfileStore(Path(store_path))
    options = {
        k: v
        for k, v in (("engine", cfg.engine), ("precision", cfg.precision), ("threads", cfg.threads))
        if v is not None
    }

    def profile(subs: list[SubNetwork], workloads: list[str]) -> list[dict]:
        return profile_subnetworks(loaded, subs, workloads, store=store, progress=True, **options)

    return run_adaptive(description, store, profile, fit_config, cfg, wanted, log)
