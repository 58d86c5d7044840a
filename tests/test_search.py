import math

import numpy as np
import pytest

from compressor.core.workload import Workload
from compressor.elastic.search_space import SubNetwork
from search.problem import SearchConfig, SubnetworkProblem, hypervolume, run_nsga2, run_random
from tests.test_search_space import smollm2_space

W = Workload.parse("prefill:1x128")


def _oracles(space):
    full = space.num_params(space.largest())

    def quality(sub):  # smaller models are worse, layers matter most: a known, smooth trade-off
        return 2.0 + 3.0 * (1 - space.num_params(sub) / full) + 0.05 * (30 - sub.num_layers)

    def latency(subs):
        return np.array([space.flops(s, W) / 1e8 for s in subs])

    return quality, latency


def test_problem_returns_known_objectives():
    space = smollm2_space()
    quality, latency = _oracles(space)
    problem = SubnetworkProblem(space, quality, latency, SearchConfig(max_latency_ms=100.0))
    subs = [space.largest(), space.smallest(), SubNetwork(432, 6, 1024, 23)]
    x = np.array([space.encode(s) for s in subs])
    out = {}
    problem._evaluate(x, out)
    for row, s in zip(out["F"], subs):
        assert row[0] == quality(s) and math.isclose(row[1], latency([s])[0])
    assert np.allclose(out["G"][:, 0], latency(subs) - 100.0)


def test_nsga2_respects_constraints_and_beats_its_first_generation():
    space = smollm2_space()
    quality, latency = _oracles(space)
    limit = float(np.median(latency(list(space.enumerate())[::50])))
    cfg = SearchConfig(population=16, generations=6, seed=1, max_latency_ms=limit)
    result = run_nsga2(space, quality, latency, cfg, progress=False)
    assert result.pareto and all(p.predicted_ms <= limit for p in result.pareto)
    assert result.hypervolume[-1] >= result.hypervolume[0] > 0
    losses = [p.loss for p in result.pareto]
    lats = [p.predicted_ms for p in result.pareto]
    assert lats == sorted(lats) and all(a >= b for a, b in zip(losses, losses[1:]))  # non-dominated, sorted
    rnd = run_random(space, quality, latency, cfg, evaluations=len(result.evaluated))
    assert hypervolume(rnd.evaluated, np.array(rnd.reference_point), cfg) > 0


def _precision_oracles(space, allowed):
    """int8: 1.6x faster, +0.15 loss; fp32 as _oracles. Any other precision is a test failure."""
    quality, latency = _oracles(space)
    penalty, speed = {"fp32": 0.0, "int8": 0.15}, {"fp32": 1.0, "int8": 1 / 1.6}

    def q(sub, precision):
        assert precision in allowed, precision
        return quality(sub) + penalty[precision]

    def lat(subs, precision):
        assert precision in allowed, precision
        return latency(subs) * speed[precision]

    return q, lat


def test_precision_gene_proposes_only_the_given_precisions_and_mixes_them_on_the_front():
    space = smollm2_space()
    q, lat = _precision_oracles(space, {"fp32", "int8"})
    cfg = SearchConfig(population=16, generations=6, seed=0, precisions=["fp32", "int8"])
    result = run_nsga2(space, q, lat, cfg, progress=False)
    assert {e.precision for e in result.evaluated} == {"fp32", "int8"}
    assert result.pareto and {p.precision for p in result.pareto} <= {"fp32", "int8"}
    for e in result.evaluated:  # each point carries the objectives of its own precision
        assert math.isclose(e.loss, q(e.arch, e.precision)) and math.isclose(
            e.predicted_ms, lat([e.arch], e.precision)[0]
        )
    single = run_nsga2(space, q, lat, SearchConfig(population=16, generations=6, seed=0, precisions=["int8"]), False)
    assert {e.precision for e in single.evaluated} == {"int8"}
    rnd = run_random(space, q, lat, cfg, evaluations=30)
    assert {e.precision for e in rnd.evaluated} <= {"fp32", "int8"}


def test_precision_gene_front_hypervolume_at_least_best_single_precision():
    space = smollm2_space()
    q, lat = _precision_oracles(space, {"fp32", "int8"})
    both = SearchConfig(population=20, generations=8, seed=0, precisions=["fp32", "int8"])
    mixed = run_nsga2(space, q, lat, both, progress=False)
    ref = np.array(mixed.reference_point)
    singles = [
        run_nsga2(space, q, lat, SearchConfig(population=20, generations=8, seed=0, precisions=[p]), False)
        for p in ("fp32", "int8")
    ]
    best_single = max(hypervolume(r.evaluated, ref, both) for r in singles)
    assert hypervolume(mixed.evaluated, ref, both) >= 0.97 * best_single


def test_search_minutes_stops_before_a_generation_that_would_overrun():
    """A budget too small for two generations runs exactly one (the first always runs); without a
    budget every generation runs; a budget several generations wide stops in between."""
    import time

    space = smollm2_space()
    quality, latency = _oracles(space)

    def slow(sub):  # ~2 ms per evaluation: a generation of 8 takes ~16 ms
        time.sleep(0.002)
        return quality(sub)

    tiny_budget = SearchConfig(population=8, generations=20, seed=0, max_minutes=1e-6)
    assert len(run_nsga2(space, slow, latency, tiny_budget, progress=False).hypervolume) == 1
    free = SearchConfig(population=8, generations=5, seed=0)
    assert len(run_nsga2(space, slow, latency, free, progress=False).hypervolume) == 5
    some = SearchConfig(population=8, generations=400, seed=0, max_minutes=0.5 / 60)
    result = run_nsga2(space, slow, latency, some, progress=False)
    assert 1 < len(result.hypervolume) < 400 and result.seconds < 0.5 + 0.2


def test_first_generation_holds_the_largest_subnetwork_at_every_precision():
    """The unpruned model at each searched precision is the front's high-quality end: the initial population
    is seeded with it, so a short search can no longer miss it; the rest stays random and seeded."""
    space = smollm2_space()
    q, lat = _precision_oracles(space, {"fp32", "int8"})
    cfg = SearchConfig(population=8, generations=1, seed=0, precisions=["fp32", "int8"])
    result = run_nsga2(space, q, lat, cfg, progress=False)
    first = {(e.arch, e.precision) for e in result.evaluated if e.generation == 0}
    assert {(space.largest(), "fp32"), (space.largest(), "int8")} <= first and len(first) == 8
    assert min(result.pareto, key=lambda e: e.loss).arch == space.largest()  # the best quality is on the front
    again = run_nsga2(space, q, lat, cfg, progress=False)
    assert [(e.arch, e.precision) for e in again.evaluated] == [(e.arch, e.precision) for e in result.evaluated]


# ---- the one dominance rule (search.dominance), used by the search's baselines and the report ----
def test_dominance_ties_count_only_as_exact_or_same_graph():
    from search.dominance import dominates

    assert dominates(1.0, 10.0, 2.0, 10.0)  # equal latency (exact numbers), better quality
    assert dominates(1.0, 9.0, 1.0, 10.0)  # equal quality, faster
    assert not dominates(1.0, 10.0, 1.0, 10.0)  # equal in both: neither dominates
    assert not dominates(1.0, 11.0, 2.0, 10.0) and not dominates(3.0, 9.0, 2.0, 10.0)  # a trade-off
    # with a tolerance, equal measured latencies prove nothing: not a tie
    assert not dominates(1.0, 10.0, 2.0, 10.0, latency_tolerance=0.05)
    # the same graph is a tie by construction whatever was measured, won on quality alone
    assert dominates(1.0, 10.3, 2.0, 10.0, latency_tolerance=0.05, same_graph=True)
    assert not dominates(2.0, 5.0, 2.0, 10.0, same_graph=True)


def test_dominance_tolerance_boundary_is_strict():
    from search.dominance import dominates

    b = 100.0
    assert not dominates(1.0, 95.0, 1.0, b, latency_tolerance=0.05)  # exactly at the boundary: not faster
    assert dominates(1.0, 94.99, 1.0, b, latency_tolerance=0.05)
    assert not dominates(1.0001, 90.0, 1.0, b, latency_tolerance=0.05)  # faster but worse
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            dominates(1.0, 1.0, 1.0, 1.0, latency_tolerance=bad)


def test_dominance_on_paired_rounds_needs_every_round():
    from search.dominance import dominates

    assert dominates(1.0, [9.0, 9.5, 8.0], 1.0, [10.0, 10.0, 10.0])
    assert not dominates(1.0, [9.0, 10.5, 8.0], 1.0, [10.0, 10.0, 10.0])  # slower in one round
    assert not dominates(1.0, [9.0, 10.0], 1.0, [10.0, 10.0])  # one tied round: neither faster nor tied
    assert dominates(1.0, [10.0, 10.0], 2.0, [10.0, 10.0])  # tied in every round, better quality
    with pytest.raises(ValueError):
        dominates(1.0, [9.0], 1.0, [10.0, 10.0])
    with pytest.raises(TypeError):
        dominates(1.0, [9.0], 1.0, 10.0)


def test_search_baselines_and_report_use_the_one_rule(monkeypatch):
    import deploy.report as report
    import search.dominance
    import search.front as front
    from search.results import Evaluated

    assert report.dominates is search.dominance.dominates and front.dominates is search.dominance.dominates
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return search.dominance.dominates(*args, **kwargs)

    monkeypatch.setattr(front, "dominates", spy)
    monkeypatch.setattr(report, "dominates", spy)
    sub = SubNetwork(432, 6, 1024, 23)
    rows = front.baseline_rows([Evaluated(sub, 2.0, 10.0, 1, 0)], {"original": Evaluated(sub, 2.5, 10.0, 2, 0)})
    assert rows[0]["dominated_by"] == [0] and calls[-1] == ((2.0, 10.0, 2.5, 10.0), {})
    arch = sub.to_dict()
    base = {"name": "original", "variant": "int8", "ms": 100.0, "ppl": 60.0, "arch": arch, "baseline": True}
    ours = {"name": "0", "variant": "int8", "ms": 101.0, "ppl": 50.0, "arch": arch, "baseline": False}
    (row,) = report.dominance([base, ours])
    assert row["dominated_by"] == ["0 int8"]  # the same graph: a tie, won on perplexity
    assert calls[-1] == (
        (50.0, 101.0, 60.0, 100.0),
        {"latency_tolerance": report.LATENCY_TOLERANCE, "same_graph": True},
    )


def test_front_points_are_not_dominated_by_any_evaluated_point():
    """The rule with no tolerance is the Pareto dominance of the search's non-dominated sorting."""
    from search.dominance import dominates

    space = smollm2_space()
    quality, latency = _oracles(space)
    result = run_random(space, quality, latency, SearchConfig(population=10, seed=3), evaluations=40)
    for p in result.pareto:
        assert not any(dominates(e.loss, e.predicted_ms, p.loss, p.predicted_ms) for e in result.evaluated)
    off = [e for e in result.evaluated if e not in result.pareto]
    for e in off:
        assert any(dominates(p.loss, p.predicted_ms, e.loss, e.predicted_ms) for p in result.pareto)
    assert off
