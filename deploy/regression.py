"""CI latency gate: is this bundle slower than its baseline? (asv-style, robust to noisy machines)

Measurement: ``blocks`` interleaved blocks; each block times the bundle's graph and then a short
single-thread reference kernel. Every latency sample is also stored *normalized* by its block's
reference time, so a machine that is uniformly slower today (another tenant, a slower runner)
does not look like a regression of the model.

Decision, on the ratio of medians current / baseline (normalized samples):

* a **block bootstrap** (blocks resampled with replacement, then samples inside them) gives a
  two-sided confidence interval of the ratio;
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
    resamples: int = 2000
    seed: int = 0


@dataclass
class Measurement:
    """Samples (ms) in interleaved blocks, with each block's reference-kernel time (ms)."""

    blocks: list[list[float]]
    reference_ms: list[float]
    identity: dict = field(default_factory=dict)

    def normalized(self) -> list[np.ndarray]:
        return [np.asarray(b) / r for b, r in zip(self.blocks, self.reference_ms)]

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Measurement":
        return Measurement([list(map(float, b)) for b in d["blocks"]], [float(r) for r in d["reference_ms"]],
                           dict(d.get("identity", {})))


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


def _block_bootstrap_medians(blocks: list[np.ndarray], rng: np.random.Generator, n: int) -> np.ndarray:
    """Medians of ``n`` block-bootstrap resamples (blocks with replacement, then samples within)."""
    k, m = len(blocks), min(len(b) for b in blocks)
    arr = np.stack([np.asarray(b)[:m] for b in blocks])  # equal-size blocks (the protocol takes equal counts)
    picks = rng.integers(0, k, size=(n, k, 1))
    inner = rng.integers(0, m, size=(n, k, m))
    return np.median(arr[picks, inner].reshape(n, k * m), axis=1)


def ratio_ci(current: list[np.ndarray], baseline: list[np.ndarray], cfg: GateConfig) -> tuple[float, float, float]:
    """Point ratio of medians and its bootstrap CI (current / baseline)."""
    rng = np.random.default_rng(cfg.seed)
    point = float(np.median(np.concatenate(current)) / np.median(np.concatenate(baseline)))
    ratios = _block_bootstrap_medians(current, rng, cfg.resamples) / _block_bootstrap_medians(baseline, rng, cfg.resamples)
    alpha = (1 - cfg.confidence) / 2
    return point, float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def compare(current: Measurement, baseline: Measurement, cfg: GateConfig) -> Verdict:
    mismatched = [f for f in IDENTITY_FIELDS if current.identity.get(f) != baseline.identity.get(f)]
    if mismatched:
        detail = ", ".join(f"{f}: {baseline.identity.get(f)!r} -> {current.identity.get(f)!r}" for f in mismatched)
        return Verdict("incomparable", 2, None, None, None,
                       f"baseline was measured differently ({detail}); re-create it here with --update-baseline")
    point, lo, hi = ratio_ci(current.normalized(), baseline.normalized(), cfg)
    cur_ms = float(np.median(np.concatenate([np.asarray(b) for b in current.blocks])))
    base_ms = float(np.median(np.concatenate([np.asarray(b) for b in baseline.blocks])))
    pct = f"{(point - 1) * 100:+.1f}% (CI {(lo - 1) * 100:+.1f}% .. {(hi - 1) * 100:+.1f}%)"
    if lo > 1 + cfg.min_effect and point > 1 + cfg.threshold:
        return Verdict("regression", 1, point, lo, hi, f"slower by {pct}, above the {cfg.threshold:.0%} threshold",
                       cur_ms, base_ms)
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
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="nasprune-latency" tests="1" failures="{failures}" '
            f'errors="{errors}" time="{seconds:.3f}">\n  <testcase classname="nasprune.check" name="{escape(name)}" '
            f'time="{seconds:.3f}">{failure}<system-out>{escape(verdict.message)}</system-out></testcase>\n</testsuite>\n')


def write_report(out: Path, name: str, verdict: Verdict, current: Measurement, cfg: GateConfig, seconds: float) -> None:
    from compressor.modeldir import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "check.json", {"name": name, "verdict": asdict(verdict), "config": asdict(cfg),
                                           "current": current.to_dict()})
    (out / "check.junit.xml").write_text(junit_xml(name, verdict, seconds))
