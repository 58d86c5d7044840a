"""Quantization recipes as precisions: graphs, torch simulation vs the engine, measured (not assumed)
quality, and the recipe identity shared by profiles, predictors and bundles."""

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.core.errors import NaspruneError
from compressor.core.precisions import RECIPES, is_quantized, needs_calibration, recipe_for
from compressor.elastic.evaluate import mean_loss
from compressor.elastic.modeldir import load_model
from compressor.elastic.quant_sim import simulate
from compressor.quant.engine_quality import engine_quality, graph_mean_loss, logits_graph
from compressor.quant.quantize import StaticCalibration, excluded_nodes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model))


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 1024, (4, 24), generator=g)


@pytest.fixture(scope="module")
def calibration_windows():
    """Token windows static recipes calibrate on: other tokens than the evaluation ``windows``."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 1024, (6, 24), generator=g)


@pytest.fixture(scope="module")
def graphs(tiny, tmp_path_factory, calibration_windows):
    """The tiny model's fp32 logits graph and each recipe's quantized graph (made once)."""
    root = tmp_path_factory.mktemp("qgraphs")
    cal = StaticCalibration(calibration_windows.numpy(), "test windows")
    out = {}
    for precision in ("fp32", *RECIPES):
        out[precision], _ = logits_graph(tiny.model, root / precision, precision, cal)
    return out


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_recipes_produce_their_kernels_and_keep_the_excluded_layers_float(graphs):
    assert "MatMulInteger" in _ops(graphs["int8"]) and "MatMulInteger" not in _ops(graphs["fp32"])
    assert "MatMulNBits" in _ops(graphs["w4"]) and "MatMulNBits" in _ops(graphs["w8"])
    fp32 = onnx.load(str(graphs["fp32"]))
    mixed = excluded_nodes(fp32, RECIPES["int8-mixed"])
    assert len([n for n in mixed if "down_proj" in n]) == 4  # one per layer of the tiny model
    head = excluded_nodes(fp32, RECIPES["int8-pc"])
    assert len(head) == 1  # the (tied) LM head only
    left_float = [n.name for n in onnx.load(str(graphs["int8-mixed"])).graph.node if n.op_type == "MatMul"]
    assert all(name in left_float for name in mixed)


def test_quantized_graph_quality_is_measured_from_the_graph(graphs, windows, tmp_path):
    """A planted quantization error (one weight scale x 50) shows up in the measured loss."""
    base, _ = graph_mean_loss(graphs["int8"], windows)
    model = onnx.load(str(graphs["int8"]))
    scales = [t for t in model.graph.initializer if t.name.endswith("_scale")]  # weight scales (activations: dynamic)
    assert scales, "no weight scale found to corrupt"
    t = scales[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 50, t.name))
    planted = tmp_path / "planted.onnx"
    onnx.save(model, str(planted))
    broken, _ = graph_mean_loss(planted, windows)
    assert abs(broken - base) > 0.05


def test_simulation_matches_the_engine(tiny, graphs, windows, calibration_windows):
    """The search's torch simulation of each recipe against ORT running the quantized graph (static
    recipes: both calibrated on the same windows, the simulation through the super-network)."""
    sn = tiny.supernet().eval()
    for precision in ("fp32", *RECIPES):
        engine, _ = graph_mean_loss(graphs[precision], windows)
        with torch.no_grad(), simulate(precision, sn.model, lambda: mean_loss(sn, calibration_windows, 2)):
            sim = mean_loss(sn, windows, 1)
        assert abs(sim - engine) < 0.02 * engine, (precision, sim, engine)


def test_static_int8_runs_integer_matmuls_on_calibrated_ranges(tiny, graphs, windows, calibration_windows, tmp_path):
    """Static INT8 quantizes only the weight MatMuls and leaves their outputs float, so ONNX Runtime
    fuses them into MatMulIntegerToFloat (no QLinearMatMul re-quantizing outputs, attention's
    activation x activation MatMuls stay float); its ranges come from the calibration text, so other
    text gives another graph; no calibration, or no calibrate call in the simulation, is refused."""
    import onnxruntime as ort

    from compressor.quant.quantize import quantize_graph

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graphs["int8-static"]), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 4 * 7 and "QLinearMatMul" not in ops  # 4 layers x 7, head fp32
    # one constant-scale QuantizeLinear per quantized input tensor (q/k/v share one, gate/up one, o, down)
    assert ops.count("QuantizeLinear") == 4 * 4 and "DynamicQuantizeLinear" not in ops
    assert needs_calibration("int8-static-mixed") and not needs_calibration("int8") and not needs_calibration("fp16")

    fp32 = graphs["fp32"]
    other = quantize_graph(fp32, tmp_path / "other.onnx", "int8-static", StaticCalibration(windows.numpy(), "other"))
    assert other["calibration"] == {"source": "other", "windows": 4, "seq_len": 24, "synthetic": False}

    def scales(path):
        return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name.endswith("_scale")]

    assert any(not np.array_equal(a, b) for a, b in zip(scales(graphs["int8-static"]), scales(tmp_path / "other.onnx")))
    with pytest.raises(NaspruneError, match="needs calibration text"):
        quantize_graph(fp32, tmp_path / "x.onnx", "int8-static")
    sn = tiny.supernet().eval()
    with pytest.raises(NaspruneError, match="needs calibration windows"):
        with simulate("int8-static", sn.model):
            pass


def test_simulation_is_scoped_and_float_precisions_are_untouched(tiny, windows):
    sn = tiny.supernet().eval()
    with torch.no_grad():
        ref = sn(windows)
        with simulate("fp32", sn.model):
            assert torch.equal(sn(windows), ref)
        with simulate("int8", sn.model):
            q = sn(windows)
            with simulate("w4", sn.model):
                assert not torch.equal(sn(windows), q)
            assert torch.equal(sn(windows), q)  # the outer simulation is restored
        assert torch.equal(sn(windows), ref)
    assert not torch.equal(q, ref)


def test_engine_quality_reports_the_recipe(tiny, windows, tmp_path):
    q = engine_quality(tiny.model, windows, "int8-mixed", work_dir=tmp_path)
    assert q.quantization["name"] == "int8-mixed" and q.quantization["nodes_kept_float"] == 5  # 4 down + head
    assert q.tokens == windows.shape[0] * (windows.shape[1] - 1) and math.isfinite(q.ppl)
    assert list(tmp_path.iterdir()) == []  # graphs are temporary


def test_precision_names():
    assert not is_quantized("fp32") and is_quantized("int8-mixed")
    with pytest.raises(NaspruneError, match="unknown precision 'int4'"):
        recipe_for("int4")


def test_profiled_recipe_is_the_shipped_recipe(tiny, tmp_path):
    """Profiling int8 times the quantized graphs and records a recipe id that differs from fp32's;
    a bundle's int8 engine carries that same id, so the int8 predictor matches what ships."""
    from deploy.bundle import build_bundle, read_manifest
    from profilers.api import profile_subnetworks
    from profilers.standalone import Protocol

    fast = Protocol(warmup_iters=1, warmup_seconds=0.0, min_iters=3, min_seconds=0.0, max_remeasure=0)
    sub = tiny.supernet().space.largest()
    recs = {
        p: profile_subnetworks(
            tiny, [sub], ["prefill:1x8"], precision=p, protocol=fast, progress=False, workdir=tmp_path / p
        )[0]
        for p in ("fp32", "int8")
    }
    assert recs["int8"]["precision"] == "int8" and recs["int8"]["recipe_id"] != recs["fp32"]["recipe_id"]
    assert recs["int8"]["export_recipe"]["quantization"]["name"] == "int8"
    bundle = build_bundle(tiny, tiny.supernet(), sub, tmp_path / "b", variants=("fp32", "int8"), log=lambda *_: None)
    engines = read_manifest(bundle)["engines"]
    assert engines["int8"]["recipe_id"] == recs["int8"]["recipe_id"]
    assert engines["fp32"]["recipe_id"] == recs["fp32"]["recipe_id"]
    assert np.isfinite(recs["int8"]["stats_ms"]["median"])


def test_quantization_aware_training_learns_through_the_rounding(tiny_model, windows):
    """Straight-through rounding: simulated int8 passes gradients to the weights, and a few steps of
    training under the simulation lower the simulated loss (what quantization-aware refine relies on)."""
    import torch.nn.functional as F

    from compressor.recovery.train import TrainConfig

    sn = load_model(str(tiny_model)).supernet()
    opt = torch.optim.SGD(sn.parameters(), lr=0.5)

    def step() -> float:
        opt.zero_grad()
        with simulate("int8", sn.model):
            logits = sn(windows)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
        loss.backward()
        return loss.item()

    first = step()
    grads = [p.grad for n, p in sn.model.named_parameters() if "q_proj" in n or "down_proj" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()
    for _ in range(4):
        step()
        opt.step()
    assert step() < first
    with pytest.raises(NaspruneError, match="quantization must be a quantization recipe"):
        TrainConfig(quantization="fp32")
    with pytest.raises(NaspruneError, match="static recipe 'int8-static' is not supported"):
        TrainConfig(quantization="int8-static")


def test_full_range_int8_is_flagged_on_avx2_cpus_without_vnni():
    """ORT's AVX2 u8 x s8 kernel saturates with full-range weights (int8-pc gave perplexity ~1e7 on an
    AMD EPYC without VNNI); 7-bit int8, float and weight-only recipes are not affected."""
    from compressor.quant.quantize import saturation_risk

    avx2_only = {"sse4_2", "avx", "avx2", "fma"}
    assert "no VNNI" in saturation_risk("int8-pc", avx2_only)
    assert "no VNNI" in saturation_risk("int8-mixed", avx2_only)
    for safe in ("int8", "fp32", "w8", "w4"):
        assert saturation_risk(safe, avx2_only) is None
    assert saturation_risk("int8-pc", avx2_only | {"avx512f", "avx512_vnni"}) is None
    assert saturation_risk("int8-pc", avx2_only | {"avx_vnni"}) is None
    assert saturation_risk("int8-pc", {"asimd", "asimddp"}) is None  # ARM: not this kernel


def test_compress_replaces_saturating_recipes_by_their_7bit_counterparts_on_such_a_host():
    """A config written for a VNNI CPU (int8-pc) runs on an AVX2-only one with int8-pc7 everywhere the
    pipeline would profile, search or ship it, with the reason recorded; on VNNI nothing changes."""
    from compressor.core.precisions import BYTES_PER_PARAM, PRECISIONS, RECIPES
    from compressor.quant.quantize import host_precision
    from nasprune.pipeline import PipelineConfig, host_safe_config

    assert set(PRECISIONS) <= set(BYTES_PER_PARAM)  # the predictor's features know every precision

    avx2_only = {"sse4_2", "avx", "avx2", "fma"}
    assert host_precision("int8-pc", avx2_only)[0] == "int8-pc7"
    assert host_precision("int8-mixed", avx2_only)[0] == "int8-mixed7"
    assert host_precision("int8", avx2_only) == ("int8", None)
    for name in ("int8-pc7", "int8-mixed7"):  # the counterparts themselves are safe there
        assert RECIPES[name].reduce_range and host_precision(name, avx2_only) == (name, None)

    cfg = PipelineConfig()
    cfg.profile.precisions = ["fp32", "int8-pc"]
    cfg.search.precisions = ["fp32", "int8-pc"]
    cfg.export.precisions = ["fp32", "int8-pc", "int8-pc7"]
    cfg.export.baseline_precisions = ["fp32", "int8", "int8-mixed"]
    safe, why = host_safe_config(cfg, avx2_only)
    assert safe.profile.precisions == ["fp32", "int8-pc7"] and safe.search.precisions == ["fp32", "int8-pc7"]
    assert safe.export.precisions == ["fp32", "int8-pc7"]  # deduplicated
    assert safe.export.baseline_precisions == ["fp32", "int8", "int8-mixed7"]
    assert set(why) == {"int8-pc", "int8-mixed"} and "no VNNI" in why["int8-pc"]
    assert cfg.profile.precisions == ["fp32", "int8-pc"]  # the caller's config is not mutated

    same, why = host_safe_config(cfg, avx2_only | {"avx512_vnni"})
    assert same.profile.precisions == ["fp32", "int8-pc"] and why == {}


def test_static_int8_bundle_is_calibrated_on_real_kv_and_matches_its_profile(tiny, calibration_windows, tmp_path):
    """A bundle's static engines are calibrated on the given text (the decode graph on the KV caches
    of the fp32 prefill graph), record that text, and carry the recipe id that profiling (synthetic
    calibration: speed does not depend on ranges) recorded; a static export without calibration text
    is refused before any work."""
    import onnxruntime as ort

    from deploy.bundle import build_bundle, graph_paths, read_manifest
    from deploy.pipeline_steps import export_bundles
    from profilers.api import profile_subnetworks
    from profilers.standalone import Protocol

    sub = tiny.supernet().space.largest()
    fast = Protocol(warmup_iters=1, warmup_seconds=0.0, min_iters=3, min_seconds=0.0, max_remeasure=0)
    rec = profile_subnetworks(
        tiny, [sub], ["decode:1x8"], precision="int8-static", protocol=fast, progress=False, workdir=tmp_path / "p"
    )[0]
    cal = StaticCalibration(calibration_windows.numpy(), "test windows")
    bundle = build_bundle(
        tiny,
        tiny.supernet(),
        sub,
        tmp_path / "b",
        variants=("fp32", "int8-static"),
        log=lambda *_: None,
        calibration=cal,
    )
    engine = read_manifest(bundle)["engines"]["int8-static"]
    assert engine["recipe_id"] == rec["recipe_id"] and np.isfinite(rec["stats_ms"]["median"])
    assert engine["calibration"]["source"] == "test windows" and engine["calibration"]["windows"] == 6

    def next_logits(variant):  # prefill 7 tokens, then decode the 8th through that variant's graphs
        paths = graph_paths(bundle, variant)
        pre, dec = (
            ort.InferenceSession(str(paths[g]), providers=["CPUExecutionProvider"]) for g in ("prefill", "decode")
        )
        ids = calibration_windows[:1, :8].numpy()
        outs = pre.run(None, {"input_ids": ids[:, :7], "attention_mask": np.ones((1, 7), np.int64)})
        past = {o.name.replace("present.", "past_key_values.", 1): v for o, v in zip(pre.get_outputs()[1:], outs[1:])}
        return dec.run(None, {"input_ids": ids[:, 7:], "attention_mask": np.ones((1, 8), np.int64), **past})[0]

    ref, q = next_logits("fp32"), next_logits("int8-static")
    assert np.isfinite(q).all() and not np.array_equal(q, ref)
    assert np.corrcoef(q.ravel(), ref.ravel())[0, 1] > 0.95  # quantized, not broken

    with pytest.raises(NaspruneError, match="static INT8 needs calibration text"):
        export_bundles(tiny, [("", sub, None)], tmp_path / "c", ["int8-static"], None, ["prefill:1x8"], False)
    assert not (tmp_path / "c").exists()
