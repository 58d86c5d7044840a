"""What a search is configured with and what it returns: plain records, no optimizer.

``SearchConfig`` (population, generations, constraints, precisions, budget), ``Evaluated`` (one
scored candidate: sub-network, precision, loss, predicted latency, parameters) and ``SearchResult``
(the front, every evaluation, the hypervolume history). ``search.problem`` produces them,
``search.front`` writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from compressor.elastic.search_space import SubNetwork


@dataclass
class SearchConfig:
    population: int = 20
    generations: int = 10
    seed: int = 0
    max_latency_ms: float | None = None
    max_params: int | None = None
    params_objective: bool = False
    precisions: list[str] | None = None  # None: architecture only (quality/latency take no precision)
    # wall-clock budget: no generation is started that would end after it (at least one runs)
    max_minutes: float | None = None


@dataclass
class Evaluated:
    arch: SubNetwork
    loss: float
    predicted_ms: float
    params: int
    generation: int
    precision: str | None = None

    def row(self) -> dict:
        return {
            "arch": self.arch.to_dict(),
            **({"precision": self.precision} if self.precision is not None else {}),
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
