"""Budgets: what a user targeting a device asks for, and which model fits each one.

A team shipping to a device does not think in perplexity ratios; it has a latency budget ("40 ms
for a 128-token prompt", "a third of what we run today") and often a memory budget. For each budget
nasprune ships the best model whose *measured* latency fits, at whatever precision, pruned or not:
the original quantized is a legitimate answer where it fits and is best, and the report says so.

This module is the pure decision core (no I/O, no models), in the shape of
``deploy/regression.py``: parse and validate budgets, pick which searched points to refine for each
budget (on *predicted* latency, before the expensive work), and choose what ships for each budget
(on *measured* latency and post-refine quality, after it). The pipeline does the I/O around it.

Budget forms (``--budget`` on the CLI, ``budgets:`` in YAML):

* ``0.35x``: latency at most 0.35 times the original fp32 model's, measured on this device for the
  chosen workload (a fraction in (0, 1]: "x" is the share of today's latency, not a speed-up);
* ``40ms``: latency at most 40 milliseconds for the chosen workload;
* ``--max-memory 300MB`` (``max_memory:``): weights at the shipped precision plus the fp32 KV cache
  at the workload's context, as the engine holds them (units B, KB, MB, GB, KiB, MiB, GiB).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from compressor.core.errors import NaspruneError

_LATENCY = re.compile(r"^\s*(?P<value>[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(?P<unit>x|ms|s)\s*$", re.IGNORECASE)
_MEMORY = re.compile(r"^\s*(?P<value>[0-9]*\.?[0-9]+)\s*(?P<unit>b|kb|mb|gb|kib|mib|gib)\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """One latency budget: ``relative`` (a share of the original fp32's measured latency) or ``ms``."""

    text: str  # as the user wrote it; the report's label
    kind: str  # "relative" | "ms"
    value: float

    def limit_ms(self, original_fp32_ms: float) -> float:
        return self.value * original_fp32_ms if self.kind == "relative" else self.value

    def to_dict(self) -> dict:
        return {"text": self.text, "kind": self.kind, "value": self.value}


def parse_budget(text: str | float) -> Budget:
    """``"0.35x"`` or ``"40ms"`` (``"0.04s"``) -> :class:`Budget`; anything else is one clear error."""
    raw = str(text)
    m = _LATENCY.match(raw)
    if not m:
        raise NaspruneError(
            f"budget {raw!r} is not a latency: write a share of the original's latency like 0.35x, or a time like 40ms"
        )
    value, unit = float(m["value"]), m["unit"].lower()
    if not math.isfinite(value) or value <= 0:
        raise NaspruneError(f"budget {raw!r} must be positive")
    if unit == "x":
        if value > 1:
            raise NaspruneError(
                f"budget {raw!r} allows {value:g}x the original's latency (slower than the original); "
                f"a budget is a share of today's latency: for {value:g}x faster write {1 / value:.3g}x"
            )
        return Budget(raw.strip(), "relative", value)
    return Budget(raw.strip(), "ms", value * (1000.0 if unit == "s" else 1.0))


def parse_memory(text: str | int | None) -> int | None:
    """``"300MB"`` -> bytes (None stays None); a bare number is bytes."""
    if text is None:
        return None
    raw = str(text)
    if raw.strip().isdigit():
        value = int(raw)
    else:
        m = _MEMORY.match(raw)
        if not m:
            raise NaspruneError(f"memory budget {raw!r} is not a size: write e.g. 300MB or 1.5GiB")
        value = int(float(m["value"]) * _MEMORY_UNITS[m["unit"].lower()])
    if value <= 0:
        raise NaspruneError(f"memory budget {raw!r} must be positive")
    return value


def parse_budgets(texts: Iterable[str | float]) -> tuple[Budget, ...]:
    """Every budget parsed, duplicates refused (two identical budgets would ship one model twice)."""
    budgets = tuple(parse_budget(t) for t in texts)
    seen = {}
    for b in budgets:
        key = (b.kind, round(b.value, 9))
        if key in seen:
            raise NaspruneError(f"budgets {seen[key]!r} and {b.text!r} are the same budget")
        seen[key] = b.text
    return budgets


@dataclass(frozen=True)
class Candidate:
    """A model that could ship: a searched point (refined) or the original at one precision."""

    label: str  # e.g. "3: 576-9-1280-24" or "original"
    arch: str
    precision: str
    params: int
    memory_bytes: int
    quality: float  # what the choice ranks on: post-refine validation perplexity (lower is better)
    baseline: bool  # True: the original at this precision, what a user would do instead
    latency_ms: float | None = None  # measured; None: not measured (cannot be chosen)
    test_ppl: float | None = None  # reported only, never chosen on

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class BudgetChoice:
    """What ships for one budget, the best baseline within the same budget, and why, in one line."""

    budget: Budget
    limit_ms: float
    shipped: Candidate | None
    best_baseline: Candidate | None
    reason: str

    def to_dict(self) -> dict:
        return {
            "budget": self.budget.to_dict(),
            "limit_ms": self.limit_ms,
            "shipped": self.shipped.to_dict() if self.shipped else None,
            "best_baseline": self.best_baseline.to_dict() if self.best_baseline else None,
            "reason": self.reason,
        }


def fits(c: Candidate, limit_ms: float, max_memory: int | None = None) -> bool:
    """Measured latency within the limit, and weights + KV cache within the memory budget."""
    if c.latency_ms is None or c.latency_ms > limit_ms:
        return False
    return max_memory is None or c.memory_bytes <= max_memory


def _best(cands: Sequence[Candidate]) -> Candidate | None:
    # lowest quality score; ties go to the faster, then the smaller model
    return min(cands, key=lambda c: (c.quality, c.latency_ms, c.memory_bytes), default=None)


def choose(
    budgets: Sequence[Budget],
    candidates: Sequence[Candidate],
    original_fp32_ms: float,
    max_memory: int | None = None,
) -> list[BudgetChoice]:
    """For each budget: the best candidate that fits (pruned or not, baselines included), and the best
    baseline that fits. A budget nothing meets is kept, with the reason, never dropped."""
    out = []
    for budget in budgets:
        limit = budget.limit_ms(original_fp32_ms)
        fitting = [c for c in candidates if fits(c, limit, max_memory)]
        best = _best(fitting)
        baseline = _best([c for c in fitting if c.baseline])
        out.append(BudgetChoice(budget, limit, best, baseline, _reason(best, baseline, limit, candidates, max_memory)))
    return out


def _reason(best, baseline, limit, candidates, max_memory) -> str:
    if best is None:
        measured = [c for c in candidates if c.latency_ms is not None]
        fastest = min(measured, key=lambda c: c.latency_ms, default=None)
        if fastest is None:
            return "nothing fits: no candidate was measured"
        mem = f" within {max_memory / 1e6:.0f} MB" if max_memory is not None else ""
        return (
            f"nothing fits{mem}: the fastest measured ({fastest.label} {fastest.precision}) takes "
            f"{fastest.latency_ms:.1f} ms > {limit:.1f} ms"
        )
    where = f"{best.latency_ms:.1f} ms <= {limit:.1f} ms"
    if best.baseline:
        return f"the original at {best.precision} fits ({where}) and no refined point that fits is better"
    if baseline is None:
        return f"only a pruned model meets it ({where}); no precision of the original fits"
    return (
        f"{best.label} {best.precision} ({where}) is better than the best original that fits "
        f"({baseline.precision}: {baseline.quality:.2f} vs {best.quality:.2f})"
    )


def refine_candidates(
    budgets: Sequence[Budget],
    points: Sequence[dict],
    original_fp32_ms: float,
    per_budget: int = 1,
    margin: float = 0.05,
) -> dict[str, list[int]]:
    """Which searched points to refine for each budget, before anything is refined or measured.

    ``points``: dicts with ``predicted_ms`` and ``quality`` (the search's objective, lower is better).
    A point qualifies for a budget when its predicted latency is at least ``margin`` under the limit
    (predictions err by a few percent; a point that misses on measurement is wasted refine time).
    Returns {budget text: indices of ``points``, best first}. Several budgets may share a point.
    """
    out = {}
    for budget in budgets:
        limit = budget.limit_ms(original_fp32_ms) * (1.0 - margin)
        ok = [i for i, p in enumerate(points) if p["predicted_ms"] <= limit]
        out[budget.text] = sorted(ok, key=lambda i: (points[i]["quality"], points[i]["predicted_ms"]))[:per_budget]
    return out


def unreachable(budgets: Sequence[Budget], fastest_predicted_ms: float, original_fp32_ms: float) -> list[str]:
    """One line per budget that even the fastest sub-network at the fastest precision cannot meet
    (by prediction, so it is said before the search and refine are paid for)."""
    return [
        f"budget {b.text} ({b.limit_ms(original_fp32_ms):.1f} ms) is below the fastest sub-network nasprune can "
        f"build here ({fastest_predicted_ms:.1f} ms predicted, {fastest_predicted_ms / original_fp32_ms:.2f}x)"
        for b in budgets
        if fastest_predicted_ms > b.limit_ms(original_fp32_ms)
    ]


def model_memory_bytes(space, sub, precision: str, workload) -> int:
    """Weights at ``precision`` plus the fp32 KV cache at ``workload``'s context: what the engine holds."""
    return int(space.weight_bytes(sub, precision) + space.kv_cache_bytes(sub, workload, "fp32"))
