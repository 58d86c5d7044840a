"""The one dominance rule: when is point ``a`` better than point ``b`` in (quality, latency)?

Both objectives are minimized (a loss or perplexity, a latency in ms). The search (predicted
latency), the report (measured latency) and ``benchmarks/pruned_vs_quantized.py`` (paired timing
rounds) all call ``dominates``; they differ only in the evidence they hand it:

* ``latency_tolerance``: the fraction by which ``a`` must be faster before it counts as faster.
  0 for exact numbers (predictions) and for paired rounds (the machine's drift cancels in a pair);
  the report's ``LATENCY_TOLERANCE`` for single measured medians, whose run-to-run drift would
  otherwise decide.
* ``same_graph``: both points run the same operators on the same shapes, so their latency is equal
  by construction and any measured gap is noise.
* a latency may be one number or a sequence of paired rounds (round ``i`` of ``a`` timed seconds
  from round ``i`` of ``b``): the comparison then has to hold in every round.
"""

from __future__ import annotations

from collections.abc import Sequence


def _rounds(a_latency: float | Sequence[float], b_latency: float | Sequence[float]) -> list[tuple[float, float]]:
    if isinstance(a_latency, Sequence) != isinstance(b_latency, Sequence):
        raise TypeError("give both latencies as numbers or both as paired rounds")
    if not isinstance(a_latency, Sequence):
        return [(float(a_latency), float(b_latency))]
    if len(a_latency) != len(b_latency) or not a_latency:
        raise ValueError(f"paired rounds need the same, non-zero count ({len(a_latency)} vs {len(b_latency)})")
    return [(float(x), float(y)) for x, y in zip(a_latency, b_latency)]


def dominates(
    a_quality: float,
    a_latency: float | Sequence[float],
    b_quality: float,
    b_latency: float | Sequence[float],
    *,
    latency_tolerance: float = 0.0,
    same_graph: bool = False,
) -> bool:
    """``a`` dominates ``b``: no worse on both objectives and better on one (lower is better).

    Latency is judged as *faster*, *tied* or *undecided*:

    * faster: ``a_latency < b_latency * (1 - latency_tolerance)`` (in every round);
    * tied: ``same_graph``, or exactly equal latencies (in every round) when
      ``latency_tolerance`` is 0, i.e. when the numbers are taken as exact;
    * undecided otherwise: slower, or a gap within the tolerance, which proves nothing either way.

    ``a`` dominates when it is faster and no worse in quality, or tied and strictly better in
    quality; never when undecided. With ``latency_tolerance=0`` and single numbers this is plain
    Pareto dominance (what NSGA-II's non-dominated sorting uses).
    """
    if not 0.0 <= latency_tolerance < 1.0:
        raise ValueError(f"latency_tolerance must be in [0, 1), not {latency_tolerance}")
    rounds = _rounds(a_latency, b_latency)
    if same_graph:
        return a_quality < b_quality
    if all(a < b * (1.0 - latency_tolerance) for a, b in rounds):
        return a_quality <= b_quality
    tied = latency_tolerance == 0.0 and all(a == b for a, b in rounds)
    return tied and a_quality < b_quality
