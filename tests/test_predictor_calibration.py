"""Anchor calibration (predictors/calibration.py): the pure core on synthetic records, a uniform
machine-speed shift cancelled, and the I/O edge (the anchor profiled with ONNX Runtime on the tiny
model) through ``nasprune predict --calibrate``.

Synthetic records are the cost formula of tests/test_predictors.py; the "later run" is the same
formula with every latency x1.3 (a machine 30% slower than during the fit).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.core.errors import NaspruneError
from compressor.core.workload import Workload
from compressor.elastic.search_space import SubNetwork
from predictors.calibration import (
    CalibratedPredictor,
    CalibrationWarning,
    anchor_from_records,
    calibrate,
    scale_factor,
)
from predictors.features import FEATURE_NAMES, feature_matrix
from predictors.fit import FitConfig, fit_predictor
from predictors.metrics import accuracy_within, mape
from predictors.modelspace import space_from_description
from tests.conftest import TINY_SPACE, tiny_configs
from tests.test_predictors import make_records, true_ms

SHIFT = 1.3
W = Workload.parse("prefill:1x64")


@pytest.fixture(scope="module")
def description():
    from dataclasses import asdict

    return {
        "hf_config": tiny_configs()["llama-gqa"].to_dict(),
        "space_config": asdict(TINY_SPACE),
        "layer_ranking": None,
    }


@pytest.fixture(scope="module")
def space(description):
    return space_from_description(description)


@pytest.fixture(scope="module")
def split(space):
    subs = list(space.enumerate())
    order = np.random.default_rng(1).permutation(len(subs))
    train = [subs[i] for i in order[:60]]
    if space.largest() not in train:
        train.append(space.largest())
    return train, [subs[i] for i in order[60:] if subs[i] != space.largest()]


@pytest.fixture(scope="module")
def fitted(space, description, split):
    records = make_records(space, split[0], workloads=("prefill:1x32", "prefill:1x64"))
    return fit_predictor(records, description, FitConfig(folds=3, candidates=("linear",))).predictor


@pytest.fixture(scope="module")
def fitted3(space, description, split):
    """The same fit storing three calibration anchors."""
    records = make_records(space, split[0], workloads=("prefill:1x32", "prefill:1x64"))
    return fit_predictor(records, description, FitConfig(folds=3, candidates=("linear",), anchors=3)).predictor


def machine(space, speed: float, noise: float = 0.0, seed: int = 5):
    """``measure(sub, workload)`` of a machine running at ``speed`` x the fit-time latency."""
    rng = np.random.default_rng(seed)

    def measure(sub: SubNetwork, w: Workload) -> float:
        f = dict(zip(FEATURE_NAMES, feature_matrix(space, [sub], w, "fp32")[0]))
        return speed * true_ms(f) * (1 + noise * rng.standard_normal())

    return measure


def at_fit_times(fitted, factor: float, w: Workload = W, spikes: dict | None = None):
    """``measure`` returning ``factor`` x each anchor's fit-time latency (x ``spikes[arch]`` more for some)."""
    fit = {SubNetwork.from_dict(a["arch"]): a["workloads"][str(w)]["median_ms"] for a in fitted.manifest["anchors"]}
    return lambda sub, wl: factor * fit[sub] * (spikes or {}).get(sub, 1.0)


# ---- pure core ----------------------------------------------------------------------------------
def test_scale_factor_is_now_over_fit_and_refuses_non_positive():
    assert scale_factor(13.0, 10.0) == pytest.approx(1.3)
    assert scale_factor(9.0, 10.0) == pytest.approx(0.9)
    for now, fit in ((0.0, 10.0), (10.0, -1.0), (float("nan"), 1.0), (1.0, float("inf"))):
        with pytest.raises(NaspruneError, match="must be positive"):
            scale_factor(now, fit)


def test_anchor_is_the_largest_subnetwork_with_most_workloads_and_its_latest_record(space):
    big, small = space.largest(), space.smallest()
    records = make_records(space, [small], workloads=("prefill:1x32", "decode:1x64"))
    records += make_records(space, [big], workloads=("prefill:1x32",))
    assert anchor_from_records(records)["arch"] == small.to_dict()  # more workloads beat more params
    records += make_records(space, [big], workloads=("decode:1x64",))
    later = make_records(space, [big], workloads=("prefill:1x32",), seed=9)[0]
    later = {**later, "key": "later", "created_at": "2027-01-01T00:00:00+00:00"}
    anchor = anchor_from_records(records + [later])
    assert anchor["arch"] == big.to_dict() and anchor["params"] == space.num_params(big)
    assert anchor["workloads"]["prefill:1x32"] == {
        "median_ms": later["stats_ms"]["median"],
        "key": "later",
        "created_at": later["created_at"],
    }
    assert set(anchor["workloads"]) == {"prefill:1x32", "decode:1x64"}
    with pytest.raises(NaspruneError, match="no records"):
        anchor_from_records([])


def test_fit_stores_the_anchor_with_its_fit_time_latency(fitted, space):
    anchor = fitted.manifest["anchor"]
    assert anchor["arch"] == space.largest().to_dict()
    f = dict(zip(FEATURE_NAMES, feature_matrix(space, [space.largest()], W, "fp32")[0]))
    assert anchor["workloads"][str(W)]["median_ms"] == pytest.approx(true_ms(f), rel=0.05)  # 1% record noise
    assert anchor["workloads"][str(W)]["key"] in fitted.manifest["training"]["keys"]


def test_calibration_scales_every_prediction_by_the_anchor_ratio(fitted, space, split):
    fit_ms = fitted.manifest["anchor"]["workloads"][str(W)]["median_ms"]
    cal = calibrate(fitted, [W], at_fit_times(fitted, 2.0))
    c = cal.calibrations[str(W)]
    assert [a["ratio"] for a in c.anchors] == pytest.approx([2.0])
    assert (c.factor, c.fit_ms, c.now_ms, c.fit_source) == (pytest.approx(2.0), fit_ms, 2.0 * fit_ms, "measured")
    held = split[1][:10]
    np.testing.assert_allclose(cal.predict_ms(held, W), 2.0 * fitted.predict_ms(held, W))
    assert cal.group == fitted.group and cal.out_of_range(held, W) == fitted.out_of_range(held, W)
    assert cal.metadata()[str(W)]["factor"] == pytest.approx(2.0)
    json.dumps(cal.metadata())  # goes into pareto.json as is
    with pytest.raises(NaspruneError, match="calibrated for prefill:1x64, not prefill:1x32"):
        cal.predict_ms(held, Workload.parse("prefill:1x32"))


def test_workload_without_an_anchor_record_uses_the_predicted_anchor(fitted, space):
    w = Workload.parse("prefill:1x48")  # inside the fitted range, never profiled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predicted = float(fitted.predict_ms([space.largest()], w)[0])
    c = calibrate(fitted, [w], lambda sub, wl: 1.1 * predicted).calibrations[str(w)]
    assert c.fit_source == "predicted" and c.factor == pytest.approx(1.1)


def test_implausible_factor_warns_and_missing_anchor_is_refused(fitted):
    with pytest.warns(CalibrationWarning, match="x3.00"):
        calibrate(fitted, [W], at_fit_times(fitted, 3.0))
    old = CalibratedPredictor.__new__(CalibratedPredictor)  # getattr on a half-built wrapper must not recurse
    with pytest.raises(AttributeError):
        getattr(old, "base")  # noqa: B009
    bare = type(fitted)(fitted.estimators, {k: v for k, v in fitted.manifest.items() if k != "anchor"}, fitted.space)
    with pytest.raises(NaspruneError, match="no calibration anchor"):
        calibrate(bare, [W], lambda sub, w: 1.0)


def test_fit_stores_three_anchors_of_spread_sizes_the_first_the_largest(fitted, fitted3, space):
    assert fitted.manifest["anchors"] == [fitted.manifest["anchor"]]  # the default: one
    anchors = fitted3.manifest["anchors"]
    assert anchors[0] == fitted3.manifest["anchor"] and len(anchors) == 3
    subs = [SubNetwork.from_dict(a["arch"]) for a in anchors]
    assert len(set(subs)) == 3 and subs[0] == space.largest()
    largest = anchors[0]["params"]
    for a, share in zip(anchors[1:], (2 / 3, 1 / 3)):  # the profiled sub-networks nearest 2/3 and 1/3 of it
        assert abs(a["params"] / largest - share) < 0.15, (a["params"] / largest, share)
        assert str(W) in a["workloads"]


def test_one_disturbed_anchor_does_not_move_the_factor_a_majority_does(fitted3):
    """The median of three ratios: one anchor timed in a 1.3x slower moment leaves the factor at the
    machine's; two such anchors (a real shift seen by most) move it."""
    subs = [SubNetwork.from_dict(a["arch"]) for a in fitted3.manifest["anchors"]]
    for spiked in subs:
        c = calibrate(fitted3, [W], at_fit_times(fitted3, 1.0, spikes={spiked: 1.3})).calibrations[str(W)]
        assert c.factor == pytest.approx(1.0)
    c = calibrate(fitted3, [W], at_fit_times(fitted3, 1.0, spikes={subs[0]: 1.3, subs[2]: 1.3})).calibrations[str(W)]
    assert c.factor == pytest.approx(1.3)
    # a predictor fitted before several anchors existed calibrates with its one anchor, as it did
    one = type(fitted3)(
        fitted3.estimators, {k: v for k, v in fitted3.manifest.items() if k != "anchors"}, fitted3.space
    )
    c = calibrate(one, [W], at_fit_times(fitted3, 1.0, spikes={subs[0]: 1.3})).calibrations[str(W)]
    assert c.factor == pytest.approx(1.3) and len(c.anchors) == 1


# ---- a uniform machine-speed shift cancels ------------------------------------------------------
def test_anchor_calibration_cancels_a_uniform_1_3x_machine_shift(fitted, space, split):
    held = split[1]
    later = machine(space, SHIFT, noise=0.01)  # the later run: 30% slower machine, 1% timing noise
    measured = np.array([later(s, W) for s in held])
    raw = fitted.predict_ms(held, W)
    cal = calibrate(fitted, [W], machine(space, SHIFT, seed=11)).predict_ms(held, W)
    # uncalibrated: every prediction ~23% low (1 - 1/1.3); calibrated: back to the predictor's own error
    assert mape(measured, raw) > 20 and accuracy_within(measured, raw, 0.10) == 0.0
    assert mape(measured, cal) < 3 and accuracy_within(measured, cal, 0.10) == 1.0
    same = calibrate(fitted, [W], machine(space, 1.0, seed=11)).predict_ms(held, W)
    np.testing.assert_allclose(cal / same, SHIFT, rtol=0.03)  # anchor noise only (1% records at fit)


# ---- I/O edge: the anchor profiled with ONNX Runtime on the tiny model ------------------------
FAST = [
    "--warmup-iters",
    "1",
    "--warmup-seconds",
    "0.05",
    "--min-iters",
    "5",
    "--min-seconds",
    "0.2",
    "--max-remeasure",
    "0",
]
runner = CliRunner()


@pytest.fixture(scope="module")
def profiled(tiny_model, tmp_path_factory):
    """A store of 3 real tiny-model profiles (largest first) and a predictor fitted on it."""
    from nasprune.cli import app

    root = tmp_path_factory.mktemp("cal")
    store = root / "p.sqlite"
    r = runner.invoke(
        app,
        ["profile", str(tiny_model), "--samples", "3", "--workload", "prefill:1x16", "--store", str(store), *FAST],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["predictor", "fit", "--store", str(store), "--out", str(root / "pred"), "--folds", "3", "--models", "linear"],
    )
    assert r.exit_code == 0, r.output
    return root


@pytest.mark.slow
def test_predict_calibrate_profiles_the_anchor_on_the_same_setup(profiled, tiny_model):
    from nasprune.cli import app
    from predictors import load_predictor

    predictor = load_predictor(profiled / "pred")
    anchor = predictor.manifest["anchor"]
    assert anchor["protocol"]["min_iters"] == 5 and anchor["threads"] == 1
    arch = json.dumps(anchor["arch"])
    args = ["predict", str(profiled / "pred"), "--arch", arch, "--workload", "prefill:1x16"]
    plain = runner.invoke(app, args)
    r = runner.invoke(app, args + ["--calibrate", "--model", str(tiny_model)])
    assert plain.exit_code == 0 and r.exit_code == 0, r.output
    factor = float(r.stderr.split(" x")[-1].split(",")[0])
    assert "calibrated: anchor" in r.stderr and "(measured)" in r.stderr
    # the printed prediction is the plain one times the factor (printed to 3 decimals of a ms)
    assert float(r.stdout.splitlines()[0]) == pytest.approx(
        float(plain.stdout.splitlines()[0]) * factor, rel=1e-3, abs=6e-4 * (1 + factor)
    )


@pytest.mark.slow
def test_anchor_measured_on_another_setup_is_refused(profiled, tiny_model):
    from compressor.elastic.modeldir import load_model
    from predictors import load_predictor
    from predictors.calibration import profile_anchor

    predictor = load_predictor(profiled / "pred")
    predictor.manifest["group"] = {**predictor.group, "fingerprint_id": "fp-another-machine"}
    with pytest.raises(NaspruneError, match="measured on another setup"):  # refused before any measuring
        profile_anchor(load_model(str(tiny_model)), predictor)


@pytest.mark.slow
def test_search_calibrate_records_the_factor_and_scales_the_latency_objective(profiled, tiny_model, english_text):
    from nasprune.cli import app

    (profiled / "heldout.txt").write_text(english_text[:20000])
    base = ["search", str(tiny_model), "--predictor", str(profiled / "pred"), "--workload", "prefill:1x16"]
    base += ["--data", str(profiled / "heldout.txt"), "--generations", "1", "--population", "4"]
    base += ["--eval-tokens", "256", "--seq-len", "32"]
    plain = runner.invoke(app, base + ["--out", str(profiled / "s-plain")])
    r = runner.invoke(app, base + ["--out", str(profiled / "s-cal"), "--calibrate"])
    assert plain.exit_code == 0 and r.exit_code == 0, r.output
    raw = json.loads((profiled / "s-plain" / "pareto.json").read_text())
    cal = json.loads((profiled / "s-cal" / "pareto.json").read_text())
    assert raw["calibration"] is None
    c = cal["calibration"]["prefill:1x16"]
    assert c["fit_source"] == "measured" and c["anchor"] == cal["original"]["arch"]  # the full model is the anchor
    assert c["factor"] == pytest.approx(c["now_ms"] / c["fit_ms"])
    assert cal["original"]["predicted_ms"] == pytest.approx(raw["original"]["predicted_ms"] * c["factor"], rel=1e-6)
    # a uniform factor changes no ranking (crowding distance is scale-free): same front, scaled milliseconds
    assert [p["arch"] for p in cal["pareto"]] == [p["arch"] for p in raw["pareto"]]
    for p, q in zip(cal["pareto"], raw["pareto"]):
        assert p["predicted_ms"] == pytest.approx(q["predicted_ms"] * c["factor"], rel=1e-6)
