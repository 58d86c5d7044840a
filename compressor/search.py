"""NSGA-II over the search space: super-network quality vs predicted latency (pymoo).

Objectives (minimized): the sub-network's mean next-token loss on held-out text through the
trained super-network (fixed token budget, cached per sub-network), the predicted latency from a
per-device predictor, and optionally parameters as a third objective. Constraints: maximum
latency and/or parameters. Integer genes index each dimension's choice list; SBX/PM work on
floats with a rounding repair (pymoo's documented recipe for integer variables), duplicates
are eliminated, the run is seeded.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from pymoo.core.callback import Callback
from pymoo.core.problem import Problem
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from compressor.errors import NaspruneError
from compressor.evaluate import mean_loss
from compressor.search_space import SearchSpace, SubNetwork
from compressor.workload import Workload


class QualityOracle:
    """Held-out loss of a sub-network through the super-network, cached per sub-network."""

    def __init__(self, supernet, windows, batch_size: int = 8):
        self.supernet, self.windows, self.batch_size = supernet.eval(), windows, batch_size
        self.cache: dict[SubNetwork, float] = {}

    def __call__(self, sub: SubNetwork) -> float:
        if sub not in self.cache:
            with self.supernet.selected(sub):
                self.cache[sub] = mean_loss(self.supernet, self.windows, self.batch_size)
        return self.cache[sub]


@dataclass
class SearchConfig:
    population: int = 20
    generations: int = 10
    seed: int = 0
    max_latency_ms: float | None = None
    max_params: int | None = None
    params_objective: bool = False


@dataclass
class Evaluated:
    arch: SubNetwork
    loss: float
    predicted_ms: float
    params: int
    generation: int

    def row(self) -> dict:
        return {
            "arch": self.arch.to_dict(),
            "params": self.params,
            "loss": self.loss,
            "ppl": math.exp(self.loss),
            "predicted_ms": self.predicted_ms,
            "generation": self.generation,
        }


@dataclass
class SearchResult:
    pareto: list[Evaluated]
    evaluated: list[Evaluated]
    hypervolume: list[float]
    reference_point: list[float]
    seconds: float
    config: SearchConfig
    history: list[dict] = field(default_factory=list)


class SubnetworkProblem(Problem):
    """pymoo Problem over integer genes; every evaluation is recorded in ``self.evaluated``."""

    def __init__(
        self,
        space: SearchSpace,
        quality: Callable[[SubNetwork], float],
        latency: Callable[[list[SubNetwork]], np.ndarray],
        cfg: SearchConfig,
    ):
        self.space, self.quality, self.latency, self.cfg = space, quality, latency, cfg
        n_constr = int(cfg.max_latency_ms is not None) + int(cfg.max_params is not None)
        super().__init__(
            n_var=len(space.free_dimensions),
            n_obj=3 if cfg.params_objective else 2,
            n_ieq_constr=n_constr,
            xl=np.zeros(len(space.free_dimensions)),
            xu=np.array(space.gene_upper_bounds()),
            vtype=int,
        )
        self.evaluated: dict[SubNetwork, Evaluated] = {}
        self.generation = 0

    def objectives(self, subs: list[SubNetwork]) -> tuple[np.ndarray, np.ndarray]:
        lat = np.asarray(self.latency(subs), dtype=float)
        loss = np.array([self.quality(s) for s in subs])
        params = np.array([self.space.num_params(s) for s in subs], dtype=float)
        for s, lo, la, p in zip(subs, loss, lat, params):
            self.evaluated.setdefault(s, Evaluated(s, float(lo), float(la), int(p), self.generation))
        cols = [loss, lat] + ([params / 1e6] if self.cfg.params_objective else [])
        cons = []
        if self.cfg.max_latency_ms is not None:
            cons.append(lat - self.cfg.max_latency_ms)
        if self.cfg.max_params is not None:
            cons.append(params - self.cfg.max_params)
        return np.column_stack(cols), (np.column_stack(cons) if cons else np.zeros((len(subs), 0)))

    def _evaluate(self, x, out, *args, **kwargs):
        subs = [self.space.decode(row) for row in np.asarray(x)]
        f, g = self.objectives(subs)
        out["F"] = f
        if self.n_ieq_constr:
            out["G"] = g


def feasible(e: Evaluated, cfg: SearchConfig) -> bool:
    return (cfg.max_latency_ms is None or e.predicted_ms <= cfg.max_latency_ms) and (
        cfg.max_params is None or e.params <= cfg.max_params
    )


def pareto_front(points: list[Evaluated], cfg: SearchConfig) -> list[Evaluated]:
    pts = [p for p in points if feasible(p, cfg)]
    if not pts:
        return []
    f = np.array([[p.loss, p.predicted_ms] + ([p.params] if cfg.params_objective else []) for p in pts])
    front = NonDominatedSorting().do(f, only_non_dominated_front=True)
    return sorted((pts[i] for i in front), key=lambda p: p.predicted_ms)


def reference_point(space: SearchSpace, quality, latency, cfg: SearchConfig) -> np.ndarray:
    """Fixed before the search (worst loss = smallest model, worst latency = largest), +5%."""
    small, big = space.smallest(), space.largest()
    lat = np.asarray(latency([big]), dtype=float)[0]
    ref = [quality(small) * 1.05, lat * 1.05]
    if cfg.params_objective:
        ref.append(space.num_params(big) / 1e6 * 1.05)
    return np.array(ref)


def hypervolume(points: list[Evaluated], ref: np.ndarray, cfg: SearchConfig) -> float:
    front = pareto_front(points, cfg)
    if not front:
        return 0.0
    f = np.array([[p.loss, p.predicted_ms] + ([p.params / 1e6] if cfg.params_objective else []) for p in front])
    f = f[(f < ref).all(axis=1)]
    return float(HV(ref_point=ref)(f)) if len(f) else 0.0


class _Progress(Callback):
    def __init__(self, problem: SubnetworkProblem, ref, cfg, bar=None, task=None):
        super().__init__()
        self.problem, self.ref, self.cfg, self.bar, self.task = problem, ref, cfg, bar, task
        self.hv: list[float] = []

    def notify(self, algorithm):
        self.hv.append(hypervolume(list(self.problem.evaluated.values()), self.ref, self.cfg))
        self.problem.generation += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, hv=self.hv[-1], n=len(self.problem.evaluated))


def run_nsga2(space: SearchSpace, quality, latency, cfg: SearchConfig, progress: bool = True) -> SearchResult:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.optimize import minimize
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if cfg.population < 2 or cfg.generations < 1:
        raise NaspruneError("search needs --population >= 2 and --generations >= 1")
    start = time.perf_counter()
    problem = SubnetworkProblem(space, quality, latency, cfg)
    ref = reference_point(space, quality, latency, cfg)
    algorithm = NSGA2(
        pop_size=cfg.population,
        sampling=IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    columns = [
        TextColumn("NSGA-II"),
        BarColumn(),
        TextColumn("gen {task.completed}/{task.total}"),
        TextColumn("HV {task.fields[hv]:.4g}"),
        TextColumn("{task.fields[n]} evaluated"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("search", total=cfg.generations, hv=0.0, n=0)
        callback = _Progress(problem, ref, cfg, bar, task)
        minimize(problem, algorithm, ("n_gen", cfg.generations), seed=cfg.seed, callback=callback, verbose=False)
    evaluated = list(problem.evaluated.values())
    return SearchResult(
        pareto_front(evaluated, cfg), evaluated, callback.hv, ref.tolist(), time.perf_counter() - start, cfg
    )


def run_random(space: SearchSpace, quality, latency, cfg: SearchConfig, evaluations: int) -> SearchResult:
    """Random search with the same evaluation budget (baseline for the benchmark)."""
    start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    problem = SubnetworkProblem(space, quality, latency, cfg)
    ref = reference_point(space, quality, latency, cfg)
    seen: list[SubNetwork] = []
    tries = 0
    while len(seen) < min(evaluations, space.size) and tries < 100 * evaluations:
        s = space.sample(rng)
        tries += 1
        if s not in seen:
            seen.append(s)
    hv = []
    for gen in range(0, len(seen), cfg.population):
        problem.generation = gen // cfg.population
        problem.objectives(seen[gen : gen + cfg.population])
        hv.append(hypervolume(list(problem.evaluated.values()), ref, cfg))
    evaluated = list(problem.evaluated.values())
    return SearchResult(pareto_front(evaluated, cfg), evaluated, hv, ref.tolist(), time.perf_counter() - start, cfg)


def write_results(
    result: SearchResult,
    out,
    space: SearchSpace,
    workload: Workload,
    original: Evaluated | None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> None:
    """pareto.json + pareto.csv + history.json + pareto.png in ``out``, written atomically under the
    ownership rule (an existing search output is replaced only with ``overwrite``)."""
    from pathlib import Path

    from compressor.modeldir import atomic_dir_write

    atomic_dir_write(
        Path(out), lambda tmp: _write_search_files(result, tmp, space, workload, original, extra), "search", overwrite
    )


def _write_search_files(
    result: SearchResult, out, space: SearchSpace, workload: Workload, original: Evaluated | None, extra: dict | None
) -> None:
    import csv

    from compressor.modeldir import write_json_atomic

    rows = [p.row() for p in result.pareto]
    for r in rows:
        r["num_kv_heads"] = space.num_kv_heads(SubNetwork.from_dict(r["arch"]))
    write_json_atomic(
        out / "pareto.json",
        {
            "workload": str(workload),
            "config": asdict(result.config),
            "pareto": rows,
            "original": original.row() if original else None,
            **(extra or {}),
        },
    )
    with open(out / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "index",
                "embed_dim",
                "num_heads",
                "num_kv_heads",
                "ffn_dim",
                "num_layers",
                "params",
                "loss",
                "ppl",
                "predicted_ms",
            ]
        )
        for i, r in enumerate(rows):
            a = r["arch"]
            w.writerow(
                [
                    i,
                    a["embed_dim"],
                    a["num_heads"],
                    r["num_kv_heads"],
                    a["ffn_dim"],
                    a["num_layers"],
                    r["params"],
                    f"{r['loss']:.5f}",
                    f"{r['ppl']:.3f}",
                    f"{r['predicted_ms']:.3f}",
                ]
            )
    write_json_atomic(
        out / "history.json",
        {
            "hypervolume": result.hypervolume,
            "reference_point": result.reference_point,
            "seconds": result.seconds,
            "evaluated": [e.row() for e in result.evaluated],
        },
    )
    plot_front(result, original, out / "pareto.png", workload)


def plot_front(result: SearchResult, original: Evaluated | None, path, workload: Workload) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ev = result.evaluated
    ax.scatter([e.predicted_ms for e in ev], [math.exp(e.loss) for e in ev], s=10, c="lightgray", label="evaluated")
    front = result.pareto
    ax.plot(
        [e.predicted_ms for e in front], [math.exp(e.loss) for e in front], "o-", c="tab:blue", label="Pareto front"
    )
    for i, e in enumerate(front):
        ax.annotate(str(i), (e.predicted_ms, math.exp(e.loss)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if original is not None:
        ax.scatter(
            [original.predicted_ms],
            [math.exp(original.loss)],
            marker="*",
            s=150,
            c="tab:red",
            label="full model (largest sub-network)",
        )
    ax.set_yscale("log")
    ax.set_xlabel(f"predicted latency, {workload} (ms)")
    ax.set_ylabel("perplexity (super-network, held out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
