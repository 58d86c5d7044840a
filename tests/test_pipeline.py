"""`nasprune compress` end to end on a tiny model with the small test tokenizer (configs/smoke.yaml)."""

import json
from pathlib import Path

from nasprune.pipeline import STAGES, Pipeline, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_compress_runs_every_stage_and_resumes(tiny_model, tmp_path):
    cfg = PipelineConfig.load(ROOT / "configs" / "smoke.yaml")
    run = tmp_path / "run"
    logs = []
    Pipeline(str(tiny_model), run, cfg, log=logs.append).execute(stop_after="predictor")  # "killed" here
    state = json.loads((run / "run.json").read_text())
    assert list(state["stages"]) == list(STAGES[:4])
    logs.clear()
    Pipeline(str(tiny_model), run, cfg, log=logs.append).execute()
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


def test_overlapping_data_roles_are_refused(tmp_path):
    import pytest

    from compressor.data import PACKAGE_DATA, check_data_roles
    from compressor.errors import NaspruneError

    novel = (PACKAGE_DATA / "northanger_abbey.txt").read_text()
    excerpt = tmp_path / "excerpt.txt"
    excerpt.write_text(novel[100_000:130_000])  # a test "file" that is really part of the training novel
    with pytest.raises(NaspruneError, match="data roles overlap: test"):
        check_data_roles(
            "builtin:northanger_abbey",
            "builtin:northanger_abbey",
            "builtin:sense_and_sensibility_validation",
            str(excerpt),
        )
    with pytest.raises(NaspruneError, match="data roles overlap: validation"):
        check_data_roles(
            "builtin:northanger_abbey",
            "builtin:northanger_abbey",
            "builtin:northanger_abbey",
            "builtin:persuasion_heldout",
        )
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  test: {excerpt}\n")
    with pytest.raises(NaspruneError, match="overlap"):
        PipelineConfig.load(config)
    # the built-in roles are disjoint
    check_data_roles(
        "builtin:northanger_abbey",
        "builtin:northanger_abbey",
        "builtin:sense_and_sensibility_validation",
        "builtin:persuasion_heldout",
    )
