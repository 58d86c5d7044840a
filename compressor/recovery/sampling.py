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

from compressor.core.errors import NaspruneError
from compressor.elastic.search_space import SearchSpace, SubNetwork


@dataclass
class ParamBins:
    """The space's sub-networks grouped into equal-width parameter-count bins (computed once)."""

    edges: np.ndarray
    members: list[list[SubNetwork]]

    @staticmethod
    def build(space: SearchSpace, num_bins: int) -> ParamBins:
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


def first_k_blocks(role: str | None, dims, size: int, sub: SubNetwork) -> list[tuple[int, int]]:
    """Contiguous index ranges that a first-k sub-network keeps along an axis of this role."""
    from compressor.elastic.layout import EMBED, FFN, GATE_UP, KV, NEOX_QKV, QKV, Q

    hd, kv = dims.head_dim, sub.num_heads // dims.q_per_group
    q_full, kv_full = dims.num_heads * hd, dims.num_kv_heads * hd
    return {
        None: [(0, size)],
        EMBED: [(0, sub.embed_dim)],
        FFN: [(0, sub.ffn_dim)],
        Q: [(0, sub.num_heads * hd)],
        KV: [(0, kv * hd)],
        NEOX_QKV: [(0, 3 * sub.num_heads * hd)],
        QKV: [(0, sub.num_heads * hd), (q_full, q_full + kv * hd), (q_full + kv_full, q_full + kv_full + kv * hd)],
        GATE_UP: [(0, sub.ffn_dim), (dims.intermediate_size, dims.intermediate_size + sub.ffn_dim)],
    }[role]


def mean_abs_weight(supernet, subs: list[SubNetwork]) -> np.ndarray:
    """Mean |w| over each sub-network's sliced weights (a mean: a sum would always favour the largest).

    One 2-D prefix-sum table per parameter answers every sub-network's rectangle in O(1).
    """
    import torch

    space, dims = supernet.space, supernet.family.dims
    totals = np.zeros(len(subs))
    kept = [set(space.kept_layers(s)) for s in subs]
    with torch.no_grad():
        for info, (_, param) in zip(space.params, supernet.model.named_parameters()):
            w = param.detach().abs().double()
            w = w.view(-1, 1) if w.ndim == 1 else w
            table = torch.zeros(w.shape[0] + 1, w.shape[1] + 1, dtype=torch.float64)
            table[1:, 1:] = w.cumsum(0).cumsum(1)
            roles = info.roles if len(info.roles) == 2 else (info.roles[0], None)
            for i, sub in enumerate(subs):
                if info.layer is not None and info.layer not in kept[i]:
                    continue
                for r0, r1 in first_k_blocks(roles[0], dims, w.shape[0], sub):
                    for c0, c1 in first_k_blocks(roles[1], dims, w.shape[1], sub):
                        totals[i] += float(table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0])
    return totals / np.array([space.num_params(s) for s in subs], dtype=float)


class CalibrateMagSampler(GridParamsSampler):
    """Importance-calibrate-mag: per parameter bin, M candidates from the enumeration, keep the
    ``keep`` of highest mean |w|; computed once per bin before training, then sampled like grid-params."""

    name = "calibrate-mag"

    def __init__(
        self, space: SearchSpace, seed: int = 0, num_bins: int = 10, candidates: int = 32, keep: int = 1, supernet=None
    ):
        if supernet is None:
            raise NaspruneError("the calibrate-mag sampler needs the super-network's weights")
        full = ParamBins.build(space, num_bins)
        rng = np.random.default_rng(seed + 7919)
        picked: list[list[SubNetwork]] = []
        for members in full.members:
            idx = rng.choice(len(members), size=min(candidates, len(members)), replace=False) if members else []
            picked.append([members[i] for i in idx])
        flat = [s for group in picked for s in group]
        scores = mean_abs_weight(supernet, flat) if flat else np.array([])
        kept, pos = [], 0
        self.candidate_scores: list[list[tuple[SubNetwork, float]]] = []
        for group in picked:
            ranked = sorted(zip(group, scores[pos : pos + len(group)]), key=lambda t: -t[1])
            pos += len(group)
            self.candidate_scores.append([(s, float(v)) for s, v in ranked])
            kept.append([s for s, _ in ranked[:keep]])
        super().__init__(space, seed=seed, bins=ParamBins(full.edges, kept))


SAMPLERS["calibrate-mag"] = CalibrateMagSampler


def make_sampler(
    name: str, space: SearchSpace, seed: int = 0, num_bins: int = 10, candidates: int = 32, supernet=None
) -> Sampler:
    if name == "random":
        return RandomSampler(space, seed)
    if name == "grid-params":
        return GridParamsSampler(space, seed, num_bins=num_bins)
    if name == "calibrate-mag":
        return CalibrateMagSampler(space, seed, num_bins=num_bins, candidates=candidates, supernet=supernet)
    raise NaspruneError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
