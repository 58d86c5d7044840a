"""CI latency gate: is this bundle slower than its baseline? (asv-style, robust to noisy machines)

Two ways to get a baseline:

* **paired** (``nasprune check BUNDLE --baseline-bundle OLD``, recommended): both bundles are
  measured in one process, alternating iteration by iteration, so a machine that turns slower
  for a moment slows both samples of a pair; pairs are resampled together;
* **stored** (``--baseline FILE``): a measurement saved earlier on this machine, normalized by
  the reference kernel's fastest block (so a uniformly slower or faster machine cancels).

The statistic is a low quantile (``quantile``, default the 10th percentile) of the samples, not
the median: on a shared or virtualized machine interference only ever *adds* time and comes in
phases (measured here: 1.3-1.6x slower for fractions of a second to seconds), so the fast end of
the distribution is the repeatable one (Chen & Revels, "Robust benchmarking in noisy
environments", 2016, argue the same for the minimum). On this machine the stored-baseline A/A
ratio spread 2.2-4.2% (log sd) this way against 5.0-5.3% for the median of per-block normalized
samples (benchmarks/gate_reliability.py keeps the raw samples).

Decision, on the ratio current / baseline of that statistic:

* a **block bootstrap** (blocks resampled with replacement, then samples inside them; in paired
  mode the same indices for both sides) gives a two-sided confidence interval of the ratio;
* **regression** (exit 1) when the lower CI bound exceeds 1 + ``min_effect`` *and* the point
  ratio exceeds 1 + ``threshold``: statistically real and big enough to matter;
* **incomparable** (exit 2) when fingerprint, engine, precision, workload or export recipe
  differ: a number from another machine or recipe is not a baseline;
* otherwise **pass** (exit 0); an improvement is reported but passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

IDENTITY_FIELDS = ("fingerprint_id", "engine", "provider", "precision", "recipe_id", "workload")


@dataclass
class GateConfig:
    threshold: float = 0.10
    min_effect: float = 0.03
    confidence: float = 0.99
    quantile: float = 0.10  # the statistic compared: this quantile of the samples (see the module doc)
    resamples: int = 2000
    seed: int = 0


@dataclass
class Measurement:
    """Samples (ms) in interleaved blocks, with each block's reference-kernel time (ms)."""

    blocks: list[list[float]]
    reference_ms: list[float]
    identity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Measurement:
        return Measurement(
            [list(map(float, b)) for b in d["blocks"]],
            [float(r) for r in d["reference_ms"]],
            dict(d.get("identity", {})),
        )


@dataclass
class Verdict:
    status: str  # pass | regression | incomparable
    exit_code: int
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    message: str
    current_median_ms: float | None = None
    baseline_median_ms: float | None = None


def statistic(m: Measurement, q: float) -> float:
    """The ``q`` quantile of all samples over the reference kernel's fastest block (both in ms)."""
    return float(np.quantile(np.concatenate([np.asarray(b) for b in m.blocks]), q) / min(m.reference_ms))


def _bootstrap_statistics(m: Measurement, picks: np.ndarray, inner: np.ndarray, q: float) -> np.ndarray:
    """``statistic`` of block-bootstrap resamples: ``picks`` (n, k) chooses blocks, ``inner`` (n, k, s) samples.

    The reference's fastest block stays fixed: the bootstrap of a minimum is inconsistent (a
    resample misses the fastest block a third of the time with 10 blocks), and the A/A runs of
    benchmarks/gate_reliability.py already price its noise in.
    """
    s = inner.shape[2]
    arr = np.stack([np.asarray(b)[:s] for b in m.blocks])  # equal-size blocks (the protocol takes equal counts)
    n = picks.shape[0]
    return np.quantile(arr[picks[:, :, None], inner].reshape(n, -1), q, axis=1) / min(m.reference_ms)


def ratio_ci(
    current: Measurement, baseline: Measurement, cfg: GateConfig, paired: bool = False
) -> tuple[float, float, float]:
    """Point ratio current / baseline of ``statistic`` and its bootstrap CI.

    Paired: sample j of block i was measured right next to the other side's sample j of block i
    (and both share each block's reference), so both sides are resampled with the same indices;
    the CI then holds only the noise that pairing does not cancel.
    """
    rng = np.random.default_rng(cfg.seed)
    point = statistic(current, cfg.quantile) / statistic(baseline, cfg.quantile)

    def draw(m: Measurement):
        k, s = len(m.blocks), min(len(b) for b in m.blocks)
        return rng.integers(0, k, size=(cfg.resamples, k)), rng.integers(0, s, size=(cfg.resamples, k, s))

    cur_idx = draw(current)
    base_idx = cur_idx if paired else draw(baseline)
    ratios = _bootstrap_statistics(current, *cur_idx, cfg.quantile) / _bootstrap_statistics(
        baseline, *base_idx, cfg.quantile
    )
    alpha = (1 - cfg.confidence) / 2
    return point, float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def _mismatch(current: Measurement, baseline: Measurement, fields: tuple[str, ...]) -> Verdict | None:
    mismatched = [f for f in fields if current.identity.get(f) != baseline.identity.get(f)]
    if not mismatched:
        return None
    detail = ", ".join(f"{f}: {baseline.identity.get(f)!r} -> {current.identity.get(f)!r}" for f in mismatched)
    return Verdict(
        "incomparable",
        2,
        None,
        None,
        None,
        f"baseline was measured differently ({detail}); re-create it here with --update-baseline",
    )


def compare(current: Measurement, baseline: Measurement, cfg: GateConfig) -> Verdict:
    """Gate decision; paired measurements (``measure_paired``) are resampled pair by pair."""
    paired = bool(current.identity.get("paired") and baseline.identity.get("paired"))
    # A paired run measured both on this machine now; only a different export recipe is allowed
    # (it may be the very change under test), so it is not an identity field there.
    fields = tuple(f for f in IDENTITY_FIELDS if not (paired and f == "recipe_id"))
    if (verdict := _mismatch(current, baseline, fields)) is not None:
        return verdict
    if paired and [len(b) for b in current.blocks] != [len(b) for b in baseline.blocks]:
        return Verdict("incomparable", 2, None, None, None, "paired measurements need the same blocks on both sides")
    point, lo, hi = ratio_ci(current, baseline, cfg, paired=paired)
    cur_ms, base_ms = (float(np.median(np.concatenate([np.asarray(b) for b in m.blocks]))) for m in (current, baseline))
    pct = f"{(point - 1) * 100:+.1f}% (CI {(lo - 1) * 100:+.1f}% .. {(hi - 1) * 100:+.1f}%, p{cfg.quantile * 100:g})"
    if lo > 1 + cfg.min_effect and point > 1 + cfg.threshold:
        return Verdict(
            "regression", 1, point, lo, hi, f"slower by {pct}, above the {cfg.threshold:.0%} threshold", cur_ms, base_ms
        )
    note = "faster" if hi < 1 - cfg.min_effect else "no significant change"
    return Verdict("pass", 0, point, lo, hi, f"{note}: {pct}", cur_ms, base_ms)


def junit_xml(name: str, verdict: Verdict, seconds: float) -> str:
    """One JUnit test case per check, so CI systems show the gate like a test."""
    failure = ""
    if verdict.status == "regression":
        failure = f'<failure message="{escape(verdict.message)}" type="LatencyRegression"/>'
    elif verdict.status == "incomparable":
        failure = f'<error message="{escape(verdict.message)}" type="IncomparableBaseline"/>'
    failures = int(verdict.status == "regression")
    errors = int(verdict.status == "incomparable")
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="nasprune-latency" tests="1" failures="{failures}" '
        f'errors="{errors}" time="{seconds:.3f}">\n  <testcase classname="nasprune.check" name="{escape(name)}" '
        f'time="{seconds:.3f}">{failure}<system-out>{escape(verdict.message)}</system-out></testcase>\n</testsuite>\n'
    )


def write_report(
    out: Path, name: str, verdict: Verdict, current: Measurement, baseline: Measurement, cfg: GateConfig, seconds: float
) -> None:
    """check.json keeps both sides' raw samples, so a verdict can be re-examined later."""
    from compressor.core.outputs import claim_output, mark_output
    from compressor.elastic.modeldir import write_json_atomic

    claim_output(out, "check", overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "check")
    write_json_atomic(
        out / "check.json",
        {
            "name": name,
            "verdict": asdict(verdict),
            "config": asdict(cfg),
            "current": current.to_dict(),
            "baseline": baseline.to_dict(),
        },
    )
    (out / "check.junit.xml").write_text(junit_xml(name, verdict, seconds))
