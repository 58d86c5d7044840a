"""Sub-network samplers shared by training, profiling and predictor fitting.

* ``random``: uniform over the space. Because parameter count is a sum of products of the
  dimensions, uniform sampling over-samples small models (the paper's Fig. 2a).
* ``grid-params``: B equal-width bins of parameter count between the smallest and largest
  sub-network; one sub-network per bin, drawn from an enumeration of the space (so the tail bins
  are never starved, as rejection sampling would starve them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressor.errors import NaspruneError
from compressor.search_space import SearchSpace, SubNetwork


@dataclass
class ParamBins:
    """The space's sub-networks grouped into equal-width parameter-count bins (computed once)."""

    edges: np.ndarray
    members: list[list[SubNetwork]]

    @staticmethod
    def build(space: SearchSpace, num_bins: int) -> "ParamBins":
        if num_bins < 1:
            raise NaspruneError("the number of parameter bins must be >= 1")
        subs = list(space.enumerate())
        params = np.array([space.num_params(s) for s in subs], dtype=float)
        lo, hi = params.min(), params.max()
        edges = np.linspace(lo, hi, num_bins + 1)
        idx = np.clip(np.searchsorted(edges, params, side="right") - 1, 0, num_bins - 1)
        members: list[list[SubNetwork]] = [[] for _ in range(num_bins)]
        for s, i in zip(subs, idx):
            members[i].append(s)
        return ParamBins(edges, members)

    @property
    def non_empty(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m]


class Sampler:
    """Draws sub-networks; every sampler is seeded and its state can be saved for exact resume."""

    name = ""

    def __init__(self, space: SearchSpace, seed: int = 0):
        self.space = space
        self.rng = np.random.default_rng(seed)

    def sample(self) -> SubNetwork:
        raise NotImplementedError

    def sample_many(self, n: int) -> list[SubNetwork]:
        return [self.sample() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class RandomSampler(Sampler):
    name = "random"

    def sample(self) -> SubNetwork:
        return self.space.sample(self.rng)


class GridParamsSampler(Sampler):
    """Cycles through the non-empty parameter bins in a shuffled order; uniform inside a bin."""

    name = "grid-params"

    def __init__(self, space: SearchSpace, seed: int = 0, num_bins: int = 10, bins: ParamBins | None = None):
        super().__init__(space, seed)
        self.bins = bins or ParamBins.build(space, num_bins)
        self._queue: list[int] = []

    def _next_bin(self) -> int:
        if not self._queue:
            self._queue = list(self.rng.permutation(self.bins.non_empty))
        return int(self._queue.pop())

    def sample(self) -> SubNetwork:
        members = self.bins.members[self._next_bin()]
        return members[int(self.rng.integers(len(members)))]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "queue": [int(q) for q in self._queue]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._queue = list(state.get("queue", []))


SAMPLERS: dict[str, type[Sampler]] = {"random": RandomSampler, "grid-params": GridParamsSampler}


def make_sampler(name: str, space: SearchSpace, seed: int = 0, **kwargs) -> Sampler:
    if name not in SAMPLERS:
        raise NaspruneError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](space, seed=seed, **kwargs)
