"""``nasprune export --repair DATA``: the bundle ships the repaired model, its engines are the repaired
graphs, and the manifest says what repair did (perplexity before/after on text it never fitted on)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compressor.core.data import PACKAGE_DATA
from deploy.bundle import graph_paths
from deploy.generate import OnnxGenerator, onnx_mean_nll
from nasprune.cli import app

runner = CliRunner()
ARCH = '{"embed_dim": 48, "num_heads": 2, "ffn_dim": 64, "num_layers": 3}'


def _nll(model, seq) -> float:
    with torch.no_grad():
        logits = model(seq).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, seq[0, 1:]).item()


def test_export_repair_ships_the_repaired_model_and_reports_perplexity(tiny_model, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text((PACKAGE_DATA / "northanger_abbey.txt").read_text()[:40_000])
    out = tmp_path / "b"
    args = ["export", str(tiny_model), "--arch", ARCH, "--out", str(out), "--repair", str(data)]
    r = runner.invoke(app, args + ["--repair-tokens", "1024", "--repair-eval-tokens", "512"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    rep = manifest["repair"]
    assert rep["applied"] == "at export" and rep["data"] == str(data) and rep["tokens"] == 1024
    assert math.isfinite(rep["ppl_before"]) and math.isfinite(rep["ppl_after"])
    assert rep["ppl_before"] != rep["ppl_after"]
    assert "held-out tokens" in rep["ppl_on"] and "512" in rep["ppl_on"]
    assert rep["mean_rel_error_after"] <= rep["mean_rel_error_before"]
    # the checkpoint is the repaired one (Llama declares the compensation biases) and plain transformers loads it
    shipped = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert shipped.config.attention_bias and shipped.config.mlp_bias
    assert (
        json.loads((out / "model" / "nasprune.json").read_text())["subnetwork"]["repair"]["ppl_after"]
        == (rep["ppl_after"])
    )
    # ... and so are the engines: the ONNX graph's NLL is the repaired model's, not the plain extraction's
    plain_dir = tmp_path / "plain"
    assert runner.invoke(app, ["extract", str(tiny_model), "--arch", ARCH, "--out", str(plain_dir)]).exit_code == 0
    plain = AutoModelForCausalLM.from_pretrained(plain_dir).eval()
    seq = torch.randint(0, shipped.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    paths = graph_paths(out, "fp32")
    engine = onnx_mean_nll(OnnxGenerator(paths["prefill"], paths["decode"]), seq.numpy())
    assert abs(engine - _nll(shipped, seq)) < 1e-3
    assert abs(_nll(plain, seq) - _nll(shipped, seq)) > 1e-3


def test_export_without_repair_says_so(tiny_model, tmp_path):
    out = tmp_path / "b"
    assert runner.invoke(app, ["export", str(tiny_model), "--arch", ARCH, "--out", str(out)]).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["repair"] is None


def test_export_repair_on_a_separate_eval_text(tiny_model, tmp_path):
    data, held = tmp_path / "calib.txt", tmp_path / "held.txt"
    data.write_text((PACKAGE_DATA / "northanger_abbey.txt").read_text()[:20_000])
    held.write_text((PACKAGE_DATA / "persuasion_heldout.txt").read_text()[:20_000])
    out = tmp_path / "b"
    args = ["export", str(tiny_model), "--arch", ARCH, "--out", str(out), "--repair", str(data)]
    r = runner.invoke(app, args + ["--repair-tokens", "512", "--repair-eval", str(held), "--repair-eval-tokens", "256"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "manifest.json").read_text())["repair"]
    assert rep["ppl_on"].startswith(str(held)) and math.isfinite(rep["ppl_after"])


def test_pipeline_export_stage_repairs_unrefined_points_on_calibration_data(tiny_model, tmp_path, monkeypatch):
    """``export: repair: true`` with refine off: each bundle is repaired on data.calibration (targets from
    the importance-permuted original) and its perplexity before/after is on data.validation."""
    import shutil

    from compressor.core.data import resolve_data
    from nasprune.pipeline import ExportConfig, Pipeline, PipelineConfig, RefineStageConfig

    cfg = PipelineConfig(
        refine=RefineStageConfig(enabled=False),
        export=ExportConfig(
            points=1, precisions=["fp32"], verify=False, baseline=False, repair=True, repair_tokens=512
        ),
    )
    cfg.export.repair_eval_tokens = 256
    run = tmp_path / "run"
    pipe = Pipeline(str(tiny_model), run, cfg, log=lambda *_: None)
    for name in ("importance", "supernet"):
        shutil.copytree(tiny_model, run / name)
    (run / "search").mkdir()
    (run / "search" / "pareto.json").write_text(json.dumps({"pareto": [{"arch": json.loads(ARCH)}]}))
    monkeypatch.setattr(Pipeline, "predictor_dir", property(lambda self: None))  # no latency predictions here
    if hasattr(Pipeline, "predictor_dirs"):
        monkeypatch.setattr(Pipeline, "predictor_dirs", property(lambda self: {}))
    info = pipe.stage_export()
    assert info["repair"] == "at export" and len(info["bundles"]) == 1
    rep = json.loads((Path(info["bundles"][0]) / "manifest.json").read_text())["repair"]
    assert rep["data"] == resolve_data(cfg.data.calibration)
    assert rep["ppl_on"].startswith(resolve_data(cfg.data.validation))
    assert math.isfinite(rep["ppl_before"]) and math.isfinite(rep["ppl_after"])
