"""NSGA-II over the search space: super-network quality vs predicted latency (pymoo).

Objectives (minimized): the sub-network's mean next-token loss on held-out text through the
trained super-network (fixed token budget, cached per sub-network), the predicted latency from a
per-device predictor, and optionally parameters as a third objective. With
``SearchConfig.precisions`` the genome gains a precision gene: a candidate is (sub-network,
precision), its loss is measured with that precision's quantization simulated
(``compressor.elastic.quant_sim``) and its latency comes from that precision's predictor; only the
precisions given (those with a fitted predictor on an engine that runs them) can be proposed. Constraints: maximum
latency and/or parameters. Integer genes index each dimension's choice list; SBX/PM work on
floats with a rounding repair (pymoo's documented recipe for integer variables), duplicates
are eliminated, the run is seeded.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
from pymoo.core.callback import Callback
from pymoo.core.problem import Problem
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from compressor.core.errors import NaspruneError
from compressor.elastic.evaluate import mean_loss
from compressor.elastic.quant_sim import simulate
from compressor.elastic.search_space import SearchSpace, SubNetwork
from search.results import Evaluated, SearchConfig, SearchResult


class QualityOracle:
    """Held-out loss of a sub-network through the super-network, cached per sub-network.

    ``calibration``: token windows a static quantization recipe fixes its activation ranges on
    (observed through the same sub-network first, as the engine's calibrator does on its graph);
    never the held-out ``windows`` themselves."""

    def __init__(self, supernet, windows, batch_size: int = 8, calibration=None):
        self.supernet, self.windows, self.batch_size = supernet.eval(), windows, batch_size
        self.calibration = calibration
        self.cache: dict[tuple[SubNetwork, str], float] = {}

    def __call__(self, sub: SubNetwork, precision: str = "fp32") -> float:
        """Loss of ``sub`` at ``precision`` (a quantization recipe is simulated in the forward)."""
        key = (sub, precision)
        if key not in self.cache:
            calibrate = None
            if self.calibration is not None:

                def calibrate():
                    return mean_loss(self.supernet, self.calibration, self.batch_size)

            with self.supernet.selected(sub), simulate(precision, self.supernet.model, calibrate):
                self.cache[key] = mean_loss(self.supernet, self.windows, self.batch_size)
        return self.cache[key]


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
        self.precisions: list[str | None] = list(cfg.precisions) if cfg.precisions else [None]
        if len(set(self.precisions)) != len(self.precisions):
            raise NaspruneError(f"search precisions repeat: {self.precisions}")
        self.precision_gene = len(self.precisions) > 1
        n_constr = int(cfg.max_latency_ms is not None) + int(cfg.max_params is not None)
        upper = list(space.gene_upper_bounds()) + ([len(self.precisions) - 1] if self.precision_gene else [])
        super().__init__(
            n_var=len(upper),
            n_obj=3 if cfg.params_objective else 2,
            n_ieq_constr=n_constr,
            xl=np.zeros(len(upper)),
            xu=np.array(upper),
            vtype=int,
        )
        self.evaluated: dict[tuple[SubNetwork, str | None], Evaluated] = {}
        self.generation = 0

    def decode(self, row) -> tuple[SubNetwork, str | None]:
        row = np.asarray(row)
        if not self.precision_gene:
            return self.space.decode(row), self.precisions[0]
        return self.space.decode(row[:-1]), self.precisions[int(round(float(row[-1])))]

    def objectives(
        self, subs: list[SubNetwork], precisions: list[str | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        precs = precisions if precisions is not None else [self.precisions[0]] * len(subs)
        lat = np.zeros(len(subs))
        for prec in set(precs):  # one predictor call per precision
            idx = [i for i, p in enumerate(precs) if p == prec]
            group = [subs[i] for i in idx]
            lat[idx] = np.asarray(self.latency(group) if prec is None else self.latency(group, prec), dtype=float)
        loss = np.array([self.quality(s) if p is None else self.quality(s, p) for s, p in zip(subs, precs)])
        params = np.array([self.space.num_params(s) for s in subs], dtype=float)
        for s, pr, lo, la, p in zip(subs, precs, loss, lat, params):
            self.evaluated.setdefault((s, pr), Evaluated(s, float(lo), float(la), int(p), self.generation, pr))
        cols = [loss, lat] + ([params / 1e6] if self.cfg.params_objective else [])
        cons = []
        if self.cfg.max_latency_ms is not None:
            cons.append(lat - self.cfg.max_latency_ms)
        if self.cfg.max_params is not None:
            cons.append(params - self.cfg.max_params)
        return np.column_stack(cols), (np.column_stack(cons) if cons else np.zeros((len(subs), 0)))

    def _evaluate(self, x, out, *args, **kwargs):
        pairs = [self.decode(row) for row in np.asarray(x)]
        f, g = self.objectives([s for s, _ in pairs], [p for _, p in pairs])
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
    """Fixed before the search (worst loss = smallest model, worst latency = largest, over the
    precisions searched), +5%."""
    small, big = space.smallest(), space.largest()
    precs = cfg.precisions or [None]
    lat = max(float(np.asarray(latency([big]) if p is None else latency([big], p), dtype=float)[0]) for p in precs)
    worst = max(quality(small) if p is None else quality(small, p) for p in precs)
    ref = [worst * 1.05, lat * 1.05]
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


def _termination(cfg: SearchConfig):
    """``cfg.generations``, or fewer where ``cfg.max_minutes`` would be overrun by the next one."""
    from pymoo.core.termination import Termination
    from pymoo.termination.collection import TerminationCollection
    from pymoo.termination.max_gen import MaximumGenerationTermination

    if cfg.max_minutes is None:
        return MaximumGenerationTermination(cfg.generations)

    class NextGenerationFits(Termination):
        """Progress = (elapsed + the slowest generation so far) / budget: stops *before* overrunning,
        unlike pymoo's TimeBasedTermination, which notices only after a whole generation too many."""

        def __init__(self, seconds: float):  # built right before minimize(): its clock is the search's
            super().__init__()
            self.seconds, self.slowest = seconds, 0.0
            self.started = self.last = time.perf_counter()

        def _update(self, algorithm):  # pymoo calls it after every generation
            now = time.perf_counter()
            self.slowest, self.last = max(self.slowest, now - self.last), now
            return min(1.0, (now - self.started + self.slowest) / self.seconds)

    return TerminationCollection(
        MaximumGenerationTermination(cfg.generations), NextGenerationFits(cfg.max_minutes * 60)
    )


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


def seed_genomes(problem: SubnetworkProblem) -> np.ndarray:
    """The largest sub-network at every searched precision, as genomes: the unpruned model at each
    precision is the high-quality end of every front (and the user's own alternative), and random
    initial genomes almost never reach it (the demo's 70 evaluations never proposed it)."""
    genes = problem.space.encode(problem.space.largest())
    if not problem.precision_gene:
        return np.array([genes])
    return np.array([genes + [i] for i in range(len(problem.precisions))])


def _seeded_sampling(seeds: np.ndarray):
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    class SeededIntegerSampling(IntegerRandomSampling):
        """pymoo's integer random sampling with its first rows replaced by ``seeds`` (the rest, and
        every later generation, unchanged; duplicates are eliminated by the algorithm as before)."""

        def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
            x = super()._do(problem, n_samples, *args, random_state=random_state, **kwargs)
            k = min(len(seeds), len(x))
            x[:k] = seeds[:k]
            return x

    return SeededIntegerSampling()


def run_nsga2(space: SearchSpace, quality, latency, cfg: SearchConfig, progress: bool = True) -> SearchResult:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.optimize import minimize
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if cfg.population < 2 or cfg.generations < 1:
        raise NaspruneError("search needs --population >= 2 and --generations >= 1")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise NaspruneError(f"search minutes must be > 0 (or absent), not {cfg.max_minutes}")
    start = time.perf_counter()
    problem = SubnetworkProblem(space, quality, latency, cfg)
    ref = reference_point(space, quality, latency, cfg)
    algorithm = NSGA2(
        pop_size=cfg.population,
        sampling=_seeded_sampling(seed_genomes(problem)),
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
        minimize(problem, algorithm, _termination(cfg), seed=cfg.seed, callback=callback, verbose=False)
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
    seen: list[tuple[SubNetwork, str | None]] = []
    tries = 0
    while len(seen) < min(evaluations, space.size * len(problem.precisions)) and tries < 100 * evaluations:
        s = (space.sample(rng), problem.precisions[int(rng.integers(len(problem.precisions)))])
        tries += 1
        if s not in seen:
            seen.append(s)
    hv = []
    for gen in range(0, len(seen), cfg.population):
        problem.generation = gen // cfg.population
        batch = seen[gen : gen + cfg.population]
        problem.objectives([s for s, _ in batch], [p for _, p in batch])
        hv.append(hypervolume(list(problem.evaluated.values()), ref, cfg))
    evaluated = list(problem.evaluated.values())
    return SearchResult(pareto_front(evaluated, cfg), evaluated, hv, ref.tolist(), time.perf_counter() - start, cfg)
