"""The gate's statistics on injected timing samples (no timing in tests)."""

import numpy as np

from deploy.regression import GateConfig, Measurement, compare, junit_xml

IDENTITY = {
    "fingerprint_id": "abc",
    "engine": "onnxruntime",
    "provider": "CPUExecutionProvider",
    "precision": "fp32",
    "recipe_id": "r1",
    "workload": "prefill:1x128",
}


def fake(median_ms: float, seed: int, blocks=5, per_block=20, noise=0.04, machine_speed=1.0, identity=IDENTITY):
    rng = np.random.default_rng(seed)
    samples, refs = [], []
    for _ in range(blocks):
        drift = machine_speed * (1 + rng.normal(0, 0.01))  # slow machine-wide drift per block
        samples.append(list(median_ms * drift * (1 + np.abs(rng.normal(0, noise, per_block)))))
        refs.append(2.0 * drift)
    return Measurement(samples, refs, dict(identity))


def test_a_a_passes():
    cfg = GateConfig()
    fails = sum(compare(fake(100, s), fake(100, 1000 + s), cfg).exit_code for s in range(30))
    assert fails == 0


def test_twenty_percent_slowdown_fails():
    verdict = compare(fake(120, 1), fake(100, 2), GateConfig())
    assert verdict.status == "regression" and verdict.exit_code == 1 and verdict.ci_low > 1.1


def test_uniformly_slower_machine_is_not_a_regression():
    verdict = compare(fake(100, 1, machine_speed=1.3), fake(100, 2), GateConfig())
    assert verdict.exit_code == 0 and abs(verdict.ratio - 1) < 0.05


def test_mismatched_fingerprint_is_incomparable():
    other = dict(IDENTITY, fingerprint_id="zzz")
    verdict = compare(fake(100, 1, identity=other), fake(100, 2), GateConfig())
    assert verdict.exit_code == 2 and "fingerprint_id" in verdict.message


def test_junit_marks_failure():
    verdict = compare(fake(130, 1), fake(100, 2), GateConfig())
    xml = junit_xml("bundle", verdict, 1.0)
    assert 'failures="1"' in xml and "<failure" in xml


def fake_pair(cur_ms: float, base_ms: float, seed: int, blocks=10, per_block=20, noise=0.03, shift_at=4, shift=1.4):
    """A paired measurement on a machine that turns ``shift`` times slower from block ``shift_at`` on,
    for both sides (they run back to back) but *not* for the reference kernel: pairing must cancel it."""
    rng = np.random.default_rng(seed)
    speed = [shift if i >= shift_at else 1.0 for i in range(blocks)]
    ident = dict(IDENTITY, paired=True)

    def side(ms):
        return [list(ms * s * (1 + np.abs(rng.normal(0, noise, per_block)))) for s in speed]

    refs = [2.0] * blocks
    return Measurement(side(cur_ms), refs, dict(ident)), Measurement(side(base_ms), refs, dict(ident))


def test_paired_cancels_a_machine_speed_shift_the_reference_misses():
    cfg = GateConfig()
    verdicts = [compare(*fake_pair(100, 100, s), cfg) for s in range(20)]
    assert all(v.exit_code == 0 for v in verdicts)
    assert max(v.ci_high - v.ci_low for v in verdicts) < 0.1
    # the same timings as a stored baseline taken before the shift: the ratio is off by the shift
    cur, _ = fake_pair(100, 100, 0, shift_at=0)
    _, base = fake_pair(100, 100, 1, shift_at=10)
    for m in (cur, base):
        m.identity.pop("paired")
    assert compare(cur, base, cfg).ratio > 1.3


def test_paired_detects_twenty_percent():
    verdicts = [compare(*fake_pair(120, 100, s), GateConfig()) for s in range(20)]
    assert all(v.exit_code == 1 for v in verdicts) and all(1.15 < v.ratio < 1.25 for v in verdicts)


def test_paired_allows_another_recipe_but_not_another_machine():
    cur, base = fake_pair(100, 100, 0)
    cur.identity["recipe_id"] = "r2"  # the change under test may be the export recipe
    assert compare(cur, base, GateConfig()).exit_code == 0
    cur.identity["fingerprint_id"] = "zzz"
    assert compare(cur, base, GateConfig()).exit_code == 2


def test_interference_phases_do_not_look_like_a_regression():
    """Stored mode: interference only adds time, in phases. The baseline caught 2 slow blocks of
    10, today's run 6: the median moves by the slow-down, the fast end (the statistic) does not."""

    def phased(slow_blocks, seed):
        m = fake(100, seed, blocks=10)
        m.blocks = [[x * (1.4 if i < slow_blocks else 1.0) for x in b] for i, b in enumerate(m.blocks)]
        return m

    cur, base = phased(6, 1), phased(2, 2)
    assert np.median(np.concatenate(cur.blocks)) / np.median(np.concatenate(base.blocks)) > 1.25
    verdict = compare(cur, base, GateConfig())
    assert verdict.exit_code == 0 and abs(verdict.ratio - 1) < 0.05
    by_median = compare(phased(6, 3), phased(2, 4), GateConfig(quantile=0.5))
    assert by_median.ratio > 1.25 and by_median.ci_high - by_median.ci_low > 0.3  # lost in the phases
