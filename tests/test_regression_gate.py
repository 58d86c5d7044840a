"""The gate's statistics on injected timing samples (no timing in tests)."""

import numpy as np

from deploy.regression import GateConfig, Measurement, compare, junit_xml

IDENTITY = {"fingerprint_id": "abc", "engine": "onnxruntime", "provider": "CPUExecutionProvider", "precision": "fp32",
            "recipe_id": "r1", "workload": "prefill:1x128"}


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
