import math

import numpy as np

from compressor.search import SearchConfig, SubnetworkProblem, hypervolume, run_nsga2, run_random
from compressor.search_space import SubNetwork
from compressor.workload import Workload
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
