import numpy as np

from compressor.recovery.sampling import GridParamsSampler, ParamBins, RandomSampler
from tests.test_search_space import smollm2_space


def test_grid_params_fills_every_bin():
    space = smollm2_space()
    bins = ParamBins.build(space, 10)
    assert bins.non_empty == list(range(10))
    sampler = GridParamsSampler(space, seed=0, bins=bins)
    drawn = sampler.sample_many(200)
    counts = np.histogram([space.num_params(s) for s in drawn], bins=bins.edges)[0]
    assert counts.min() == counts.max() == 20  # one per bin per cycle: flat histogram


def test_random_oversamples_small_models_relative_to_grid():
    space = smollm2_space()
    bins = ParamBins.build(space, 10)
    drawn = RandomSampler(space, seed=0).sample_many(2000)
    counts = np.histogram([space.num_params(s) for s in drawn], bins=bins.edges)[0]
    assert counts[:3].sum() > 3 * counts[-3:].sum()  # the paper's Fig. 2a point


def test_sampler_state_resumes_exactly():
    space = smollm2_space()
    a = GridParamsSampler(space, seed=3, num_bins=5)
    a.sample_many(7)
    state = a.state_dict()
    b = GridParamsSampler(space, seed=99, num_bins=5)
    b.load_state_dict(state)
    assert a.sample_many(10) == b.sample_many(10)
