"""Workload mixes (``prefill:1x512 + 128*decode:1x512``): parsing, the weighted-sum latency the search
ranks by, and export verification of the same mix."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from compressor.core.errors import NaspruneError
from compressor.core.workload import MixMember, Workload, WorkloadMix
from compressor.elastic.search_space import SubNetwork
from tests.conftest import synthetic_record

P8, D8 = Workload.parse("prefill:1x8"), Workload.parse("decode:1x8")


# ---- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, canonical",
    [
        ("prefill:1x128", "prefill:1x128"),
        ("  prefill:1x128 ", "prefill:1x128"),
        ("prefill:1x512 + 128*decode:1x512", "prefill:1x512 + 128*decode:1x512"),
        ("prefill:1x512   +   128.0 * decode:1x512", "prefill:1x512 + 128*decode:1x512"),
        ("0.3*generate:1x128+32 + 0.7*generate:1x512+64", "0.3*generate:1x128+32 + 0.7*generate:1x512+64"),
        ("1*prefill:1x8", "prefill:1x8"),
        ("2*prefill:1x8", "2*prefill:1x8"),
        ("1e-3*decode:4x64 + prefill:4x64", "0.001*decode:4x64 + prefill:4x64"),
        (".25*decode:1x8 + 0.1*prefill:1x8", "0.25*decode:1x8 + 0.1*prefill:1x8"),
    ],
)
def test_parse_prints_canonically_and_round_trips(text, canonical):
    mix = WorkloadMix.parse(text)
    assert str(mix) == canonical
    assert WorkloadMix.parse(str(mix)) == mix and hash(WorkloadMix.parse(canonical)) == hash(mix)


def test_a_plain_workload_is_a_mix_of_one_with_weight_one():
    mix = WorkloadMix.parse("generate:1x128+32")
    assert mix.members == (MixMember(Workload.parse("generate:1x128+32"), 1.0),)
    assert mix.single == Workload.parse("generate:1x128+32") and str(mix) == "generate:1x128+32"
    assert WorkloadMix.of(Workload.parse("generate:1x128+32")) == mix == WorkloadMix.of("generate:1x128+32")
    assert WorkloadMix.parse("2*prefill:1x8").single is None
    request = WorkloadMix.parse("prefill:1x512 + 128*decode:1x512")
    assert request.workloads == (Workload.parse("prefill:1x512"), Workload.parse("decode:1x512"))
    assert [m.weight for m in request.members] == [1.0, 128.0] and request.single is None


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "it is empty"),
        ("prefill:1x128+decode:1x512", "space on each side"),
        ("0.3*prefill:1x128+0.7*generate:1x512+64", "space on each side"),
        ("generate:1x8+4*decode:1x8", "space on each side"),
        ("prefill:1x8 +decode:1x8", "space on each side"),
        ("prefill:1x8 + ", "a term on each side"),
        ("+ prefill:1x8", "a term on each side"),
        ("0*prefill:1x8", "must be a positive number"),
        ("1e999*prefill:1x8", "must be a positive number"),
        ("-1*prefill:1x8", "weight '-1' is not a positive number"),
        ("nan*prefill:1x8", "weight 'nan'"),
        ("x*prefill:1x8", "weight 'x'"),
        ("2*3*prefill:1x8", "weight '2*3'"),
        ("*prefill:1x8", "weight ''"),
        ("prefill:1x8 + prefill:1x8", "appears twice"),
        ("prefill:1x8 + 2*decode:0x8", "must be >= 1"),
        ("prefill:1x8 + 2*decod:1x8", "bad workload 'decod:1x8'"),
        ("generate:1x8", "bad workload"),
    ],
)
def test_bad_mixes_are_refused_in_one_line(text, needle):
    with pytest.raises(NaspruneError) as e:
        WorkloadMix.parse(text)
    assert needle in str(e.value) and "\n" not in str(e.value) and "bad workload" in str(e.value)


def test_a_mix_built_in_code_is_checked_too():
    with pytest.raises(NaspruneError, match="positive"):
        WorkloadMix((MixMember(P8, -1.0),))
    with pytest.raises(NaspruneError, match="no workload"):
        WorkloadMix(())


def test_expected_latency_is_the_weighted_sum():
    mix = WorkloadMix.parse("0.3*prefill:1x8 + 0.7*decode:1x8")
    ms = {P8: 10.0, D8: 2.0}
    assert math.isclose(mix.expected(ms.__getitem__), 0.3 * 10 + 0.7 * 2)
    arrays = {P8: np.array([10.0, 20.0]), D8: np.array([1.0, 3.0])}
    assert np.allclose(mix.expected(arrays.__getitem__), [0.3 * 10 + 0.7 * 1, 0.3 * 20 + 0.7 * 3])


# ---- prediction --------------------------------------------------------------------------------
class FakePredictor:
    """prefill ms grows with width x depth x prompt length, decode ms with depth mostly: a mix of the
    two ranks sub-networks differently from either workload alone. Fitted on prefill and decode, batch 1,
    lengths 8..64."""

    def __init__(self, precision: str = "fp32", kinds=("prefill", "decode")):
        self.group = {"precision": precision, "engine": "onnxruntime", "fingerprint_id": "fp", "recipe_id": "r"}
        box = {"batch": [1, 1], "seq": [8, 64], "new_tokens": [0, 0]}
        self.manifest = {"training": {"ranges": {"workloads": {k: dict(box) for k in kinds}}}}
        self.calls: list[str] = []

    def predict_ms(self, subs, workload, quantile="median"):
        self.calls.append(str(workload))
        if workload.kind == "prefill":
            return np.array([1e-6 * s.embed_dim * s.ffn_dim * s.num_layers * workload.seq for s in subs])
        return np.array([0.3 * s.num_layers + 0.01 * s.num_heads for s in subs])

    def out_of_range(self, subs, workload):
        return []


SUBS = [SubNetwork(32, 2, 64, 2), SubNetwork(64, 4, 128, 4), SubNetwork(64, 4, 32, 1)]


def test_predict_mix_ms_is_the_weighted_sum_of_the_predictions():
    from predictors.mix import predict_mix_ms

    fake = FakePredictor()
    mix = WorkloadMix.parse("prefill:1x8 + 16*decode:1x8")
    got = predict_mix_ms(fake, SUBS, mix)
    want = fake.predict_ms(SUBS, P8) + 16 * fake.predict_ms(SUBS, D8)
    assert got.shape == (3,) and np.allclose(got, want)
    assert np.array_equal(predict_mix_ms(fake, SUBS, "prefill:1x8"), fake.predict_ms(SUBS, P8))  # plain: as is
    assert predict_mix_ms(fake, [], mix).shape == (0,)


def _synthetic_records(space, workloads):
    """Profile records whose latency is known: prefill grows with parameters x length, decode with layers."""
    rng = np.random.default_rng(0)
    out, noise = [], {"std": 0.0, "cv": 0.01, "count": 5}
    for s in space.enumerate():
        for w in workloads:
            wl = Workload.parse(w)
            base = 1e-5 * space.num_params(s) * wl.seq / 8 if wl.kind == "prefill" else 0.2 * s.num_layers
            ms = (0.3 + base) * (1 + 0.01 * rng.standard_normal())
            out.append(
                synthetic_record(
                    space, s, w, ms, stats={**dict.fromkeys(("min", "median", "mean", "p90", "p99"), ms), **noise}
                )
            )
    return out


@pytest.fixture(scope="module")
def fitted(tiny_model):
    """A real predictor fitted on prefill:1x8 and decode:1x8 .. decode:1x32 records of the tiny model."""
    from predictors.fit import FitConfig, fit_predictor
    from predictors.modelspace import describe_model, space_from_description

    description = describe_model(str(tiny_model))
    space = space_from_description(description)
    records = _synthetic_records(space, ["prefill:1x8", "decode:1x8", "decode:1x32"])
    return fit_predictor(records, description, FitConfig(folds=2, candidates=("linear",))).predictor


def test_a_real_predictor_predicts_a_mix_as_the_weighted_sum(fitted):
    from predictors.mix import check_mix, predict_mix_ms

    subs = list(fitted.space.enumerate())[:5]
    mix = WorkloadMix.parse("prefill:1x8 + 32*decode:1x8")
    assert np.allclose(
        predict_mix_ms(fitted, subs, mix), fitted.predict_ms(subs, P8) + 32 * fitted.predict_ms(subs, D8)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_mix([fitted], "prefill:1x8 + 4*decode:1x16") == []  # inside every fitted range: silent
    with pytest.warns(UserWarning, match=r"decode:1x64 seq=64 outside trained 8\.\.32"):
        assert check_mix([fitted], "prefill:1x8 + 4*decode:1x64")
    with pytest.raises(NaspruneError, match="outside trained"):
        check_mix([fitted], "prefill:1x8 + 4*decode:1x64", strict=True)
    with pytest.raises(NaspruneError, match="not generate"):
        check_mix([fitted], "prefill:1x8 + generate:1x8+4")


# ---- the search ranks by the mix -----------------------------------------------------------------
def _search(tiny_model, tmp_path, monkeypatch, workload, fake=None, minutes=None):
    import search.driver as driver
    from compressor.elastic.modeldir import load_model
    from search.problem import SearchConfig

    fake = fake or FakePredictor()
    monkeypatch.setattr(driver, "load_predictor", lambda d, strict=False: fake)
    text = tmp_path / "heldout.txt"
    text.write_text("It is a truth universally acknowledged that a tiny model needs held-out text. " * 30)
    out = tmp_path / "search"
    cfg = SearchConfig(population=8, generations=3, seed=0, max_minutes=minutes)
    driver.run_search_cli(load_model(str(tiny_model)), tmp_path / "p", workload, str(text), out, cfg, 256, 32)
    return fake, json.loads((out / "pareto.json").read_text()), json.loads((out / "history.json").read_text())


def test_search_records_the_stage_budget_and_nsga2s_share_of_it(tiny_model, tmp_path, monkeypatch):
    """--minutes bounds the whole search stage; pareto.json keeps the user's budget as the config and
    says how much of it NSGA-II got (the rest was reserved for the baselines' evaluations)."""
    _, pareto, _ = _search(tiny_model, tmp_path, monkeypatch, "prefill:1x32", minutes=5.0)
    assert pareto["config"]["max_minutes"] == 5.0
    assert 0 < pareto["nsga2_minutes"] < 5.0


def test_search_ranks_sub_networks_by_the_mix(tiny_model, tmp_path, monkeypatch):
    mix = WorkloadMix.parse("prefill:1x32 + 8*decode:1x32")
    fake, pareto, history = _search(tiny_model, tmp_path, monkeypatch, str(mix))
    assert pareto["workload"] == str(mix)
    assert pareto["workload_terms"] == [
        {"workload": "prefill:1x32", "weight": 1.0},
        {"workload": "decode:1x32", "weight": 8.0},
    ]
    assert {"prefill:1x32", "decode:1x32"} <= set(fake.calls)

    def mix_ms(arch: dict) -> float:
        s = SubNetwork.from_dict(arch)
        return float(fake.predict_ms([s], mix.workloads[0])[0] + 8 * fake.predict_ms([s], mix.workloads[1])[0])

    evaluated = history["evaluated"]
    assert len(evaluated) > len(pareto["pareto"]) >= 1
    for row in evaluated + pareto["pareto"] + [pareto["original"]]:  # every latency objective is the mix's
        assert math.isclose(row["predicted_ms"], mix_ms(row["arch"]), rel_tol=1e-9)
    for p in pareto["pareto"]:  # the front is non-dominated under (loss, mix latency)
        assert not any(
            e["loss"] <= p["loss"]
            and e["predicted_ms"] <= p["predicted_ms"]
            and (e["loss"] < p["loss"] or e["predicted_ms"] < p["predicted_ms"])
            for e in evaluated
        )
    # and an evaluated point that is dominated under the mix is not on the front
    front = {json.dumps(p["arch"], sort_keys=True) for p in pareto["pareto"]}
    for e in evaluated:
        if json.dumps(e["arch"], sort_keys=True) not in front:
            assert any(p["loss"] <= e["loss"] and p["predicted_ms"] <= e["predicted_ms"] for p in pareto["pareto"])


def test_search_refuses_a_mix_term_the_predictor_never_saw(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(NaspruneError, match="not generate"):
        _search(tiny_model, tmp_path, monkeypatch, "prefill:1x32 + generate:1x32+8", FakePredictor())


# ---- export verification on the same mix -------------------------------------------------------
def test_verify_measures_every_term_once_and_stores_the_weighted_total(monkeypatch):
    import deploy.measure as measure
    from deploy.pipeline_steps import predictions, verify
    from deploy.report import front_points

    true_ms = {P8: 4.0, D8: 0.5}
    calls = []

    def fake_measure(bundle, w, variant="fp32", threads=1, device="cpu", protocol=None):
        calls.append((str(w), variant))
        ms = true_ms[w]
        return {"stats_ms": {"median": ms, "mean": 1.1 * ms, "p90": 1.3 * ms}, "fingerprint_id": "fp", "env": {}}

    monkeypatch.setattr(measure, "measure_bundle", fake_measure)
    fake, sub = FakePredictor(), SUBS[0]
    mix = WorkloadMix.parse("prefill:1x8 + 16*decode:1x8")
    workloads = [WorkloadMix.parse("prefill:1x8"), mix]
    predicted = predictions({"pdir": fake}, sub, workloads, ["fp32"], {"fp32": "r"})
    p8, d8 = float(fake.predict_ms([sub], P8)[0]), float(fake.predict_ms([sub], D8)[0])
    assert predicted["fp32"]["prefill:1x8"] == p8 and predicted["fp32"]["decode:1x8"] == d8
    assert math.isclose(predicted["fp32"][str(mix)], p8 + 16 * d8)

    lines = []
    measured = verify("unused", workloads, ["fp32"], 1, predicted, log=lines.append)
    assert sorted(calls) == [("decode:1x8", "fp32"), ("prefill:1x8", "fp32")]  # prefill:1x8 measured once
    plain, entry = measured["fp32"]["prefill:1x8"], measured["fp32"][str(mix)]
    assert plain["stats_ms"]["median"] == 4.0 and "terms" not in plain
    assert entry["stats_ms"] == {"median": 4.0 + 16 * 0.5, "mean": 1.1 * (4.0 + 16 * 0.5)}
    assert [(t["workload"], t["weight"], t["stats_ms"]["median"]) for t in entry["terms"]] == [
        ("prefill:1x8", 1.0, 4.0),
        ("decode:1x8", 16.0, 0.5),
    ]
    assert math.isclose(entry["predicted_ms"], p8 + 16 * d8)
    assert math.isclose(entry["error"], 12.0 / (p8 + 16 * d8) - 1)
    decode_term = entry["terms"][1]
    assert math.isclose(decode_term["predicted_ms"], d8) and math.isclose(decode_term["error"], 0.5 / d8 - 1)
    assert any(str(mix) in line for line in lines) and any("16 x decode:1x8" in line for line in lines)
    # the report and its dominance table read the mix like any workload
    manifest = {"latency": {"measured": measured}, "accuracy": {"ppl": 9.0}}
    (point,) = front_points({"b": manifest}, str(mix))
    assert point["ms"] == 12.0


def test_measure_mix_on_a_real_bundle(tiny_model, tmp_path):
    from compressor.elastic.modeldir import load_model
    from deploy.bundle import build_bundle
    from deploy.measure import measure_mix
    from profilers.standalone import Protocol

    loaded = load_model(str(tiny_model))
    bundle = build_bundle(loaded, loaded.supernet(), SubNetwork(32, 2, 64, 2), tmp_path / "b", log=lambda *_: None)
    quick = Protocol(warmup_iters=1, warmup_seconds=0.0, min_iters=3, min_seconds=0.0, max_remeasure=0)
    runs: dict = {}
    mix = WorkloadMix.parse("prefill:1x8 + 4*decode:1x8")
    r = measure_mix(bundle, mix, protocol=quick, measured=runs)
    assert set(runs) == {P8, D8}
    medians = {w: runs[w]["stats_ms"]["median"] for w in runs}
    assert all(ms > 0 for ms in medians.values())
    assert math.isclose(r["stats_ms"]["median"], medians[P8] + 4 * medians[D8])
    assert [t["workload"] for t in r["terms"]] == ["prefill:1x8", "decode:1x8"] and r["fingerprint_id"]
    assert measure_mix(bundle, WorkloadMix.parse("prefill:1x8"), measured=runs) is runs[P8]  # reused, not re-run


# ---- the compress config ----------------------------------------------------------------------
def test_compress_config_needs_every_term_of_the_search_mix_profiled(tmp_path):
    from nasprune.pipeline import PipelineConfig

    config = tmp_path / "c.yaml"
    config.write_text(
        "profile:\n  workloads: [prefill:1x128, decode:1x128]\n"
        "search:\n  workload: prefill:1x128 + 64.0*decode:1x128\n"
        "export:\n  workloads: ['prefill:1x128   +  64*decode:1x128', prefill:1x128]\n"
    )
    cfg = PipelineConfig.load(config)
    assert cfg.search.workload == "prefill:1x128 + 64*decode:1x128"  # canonical: the manifests' key
    assert cfg.export.workloads == ["prefill:1x128 + 64*decode:1x128", "prefill:1x128"]
    config.write_text("profile:\n  workloads: [prefill:1x128]\nsearch:\n  workload: prefill:1x128 + 64*decode:1x128\n")
    with pytest.raises(NaspruneError, match=r"section 'search': workload\(s\) \['decode:1x128'\] .* not profiled"):
        PipelineConfig.load(config)
    config.write_text("export:\n  workloads: ['prefill:1x128+decode:1x128']\n")
    with pytest.raises(NaspruneError, match="section 'export': bad workload mix"):
        PipelineConfig.load(config)
