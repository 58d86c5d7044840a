"""`nasprune compress` end to end on a tiny model with the real tokenizer (configs/smoke.yaml)."""

import json
from pathlib import Path


from compressor.pipeline import STAGES, Pipeline, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_compress_runs_every_stage_and_resumes(tiny_real, tmp_path):
    cfg = PipelineConfig.load(ROOT / "configs" / "smoke.yaml")
    run = tmp_path / "run"
    logs = []
    Pipeline(str(tiny_real), run, cfg, log=logs.append).execute(stop_after="predictor")  # "killed" here
    state = json.loads((run / "run.json").read_text())
    assert list(state["stages"]) == list(STAGES[:4])
    logs.clear()
    Pipeline(str(tiny_real), run, cfg, log=logs.append).execute()
    skipped = [line for line in logs if "done earlier" in line]
    assert len(skipped) == 4  # importance..predictor not redone
    state = json.loads((run / "run.json").read_text())
    assert list(state["stages"]) == list(STAGES)
    pareto = json.loads((run / "search" / "pareto.json").read_text())
    assert pareto["pareto"]
    bundles = sorted(p for p in (run / "bundles").iterdir() if (p / "manifest.json").exists())
    assert bundles
    manifest = json.loads((bundles[0] / "manifest.json").read_text())
    assert {"fp32", "int8"} <= set(manifest["engines"])
    assert manifest["latency"]["measured"]["fp32"]["prefill:1x32"]["stats_ms"]["median"] > 0
    assert manifest["accuracy"]["ppl"] > 1 and manifest["accuracy"]["engine_ppl"]["int8"] > 1
    assert "predicted_ms" in manifest["latency"]["measured"]["fp32"]["prefill:1x32"]
    report = (run / "report.md").read_text()
    assert "Pareto front" in report and (run / "pareto.png").exists()
