"""The compress pipeline's stage objects, its config sections that load into the algorithms' own configs,
and the stage decisions ``compress`` and the stage commands take with the same functions."""

from __future__ import annotations

import inspect
from dataclasses import fields
from types import SimpleNamespace

import pytest

from compressor.core.errors import NaspruneError
from compressor.recovery.bld import BlockDistillConfig
from compressor.recovery.refine import RefineConfig, qat_recipe
from nasprune.pipeline import STAGE_LIST, STAGES, Pipeline, PipelineConfig, ProfileConfig


def test_stages_have_one_shape_and_the_order_compress_runs_them():
    assert STAGES == (
        "importance",
        "blocks",
        "train",
        "profile",
        "predictor",
        "search",
        "refine",
        "export",
        "evaluate",
        "report",
    )
    for stage in STAGE_LIST:
        assert callable(stage.run) and stage.writes, stage.name
        assert stage.run.__module__ == f"nasprune.stages.{stage.name}"  # one file per stage


def test_refine_and_blocks_sections_load_into_the_algorithm_configs(tmp_path):
    """Every RefineConfig / BlockDistillConfig setting is settable from YAML (flat, beside the stage's own),
    unknown keys are refused in one line, and the defaults are the dataclasses' own."""
    assert PipelineConfig().refine.config == RefineConfig() and PipelineConfig().blocks.config == BlockDistillConfig()
    config = tmp_path / "c.yaml"
    config.write_text(
        "refine:\n  minutes: 1.5\n  warmup_steps: 7\n  distill_topk: 16\n  block_lr: 0.0003\n"
        "  quantization_aware: false\nblocks:\n  enabled: true\n  seed: 3\n  threads: 2\n"
    )
    cfg = PipelineConfig.load(config)
    r = cfg.refine.config
    assert (r.minutes, r.warmup_steps, r.distill_topk, r.block_lr) == (1.5, 7, 16, 0.0003)
    assert cfg.refine.quantization_aware is False and cfg.refine.enabled is True
    assert cfg.blocks.enabled and (cfg.blocks.config.seed, cfg.blocks.config.threads) == (3, 2)
    flat = cfg.to_dict()["refine"]  # run.json records the section as the YAML spells it
    assert flat["warmup_steps"] == 7 and flat["enabled"] is True and "config" not in flat
    assert "quantization" not in flat
    for bad, needle in [
        ("refine:\n  warmup_step: 3\n", "unknown settings ['warmup_step'] in 'refine'"),
        ("refine:\n  quantization: int8\n", "unknown settings ['quantization'] in 'refine'"),  # chosen per point
        ("blocks:\n  thread: 2\n", "unknown settings ['thread'] in 'blocks'"),
        ("refine:\n  warmup_steps: '3'\n", "refine.warmup_steps must be of type int"),
        ("refine:\n  minutes: 0\n", "section 'refine': refine minutes must be > 0"),
    ]:
        config.write_text(bad)
        with pytest.raises(NaspruneError, match=None) as e:
            PipelineConfig.load(config)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_option_defaults_are_the_dataclass_defaults():
    from compressor.cli.recovery import distill_blocks, refine

    def defaults(command):
        return {k: p.default.default for k, p in inspect.signature(command).parameters.items()}

    r, b = defaults(refine), defaults(distill_blocks)
    for f in fields(RefineConfig):
        if f.name in r:
            assert r[f.name] == getattr(RefineConfig(), f.name), f.name
    assert r["no_repair"] is (not RefineConfig().repair)
    for f in fields(BlockDistillConfig):
        if f.name in b:
            assert b[f.name] == getattr(BlockDistillConfig(), f.name), f.name
    assert (RefineConfig().minutes, RefineConfig().batch_size, RefineConfig().lr) == (3.0, 2, 2e-4)


def test_qat_recipe_is_the_refine_stage_decision():
    assert qat_recipe("int8-pc") == "int8-pc" and qat_recipe("w8") == "w8"
    assert qat_recipe("int8-static") is None  # calibrated on the refined weights at export: trains in float
    assert qat_recipe("fp32") is None and qat_recipe(None) is None
    assert qat_recipe("int8-pc", quantization_aware=False) is None


def test_search_command_drops_the_recipes_compress_drops(tmp_path, monkeypatch):
    """A recipe the profiles measured no faster than fp32 is left out of ``nasprune search --store`` exactly
    as compress's search stage leaves it out: both call search.driver.searched_precisions."""
    from typer.testing import CliRunner

    import compressor.elastic.modeldir
    import nasprune.cli
    import predictors.dataset
    import search.driver

    run = tmp_path / "run"
    pipe = Pipeline("default", run, PipelineConfig(profile=ProfileConfig(precisions=["fp32", "int8", "w8"])))
    precisions = pipe.cfg.profile.precisions  # (after any substitution for this host)
    slow = precisions[2]
    arch = {"embed_dim": 576, "num_layers": 30}
    records = [
        {"arch": arch, "workload": "prefill:1x128", "precision": p, "stats_ms": {"median": ms}}
        for p, ms in zip(precisions, (100.0, 50.0, 104.0))
    ]
    monkeypatch.setattr(predictors.dataset, "read_store", lambda *_, **__: records)
    searched = {}

    def fake_search(loaded, predictor_dir, workload, data, out, cfg, *args, **kwargs):
        searched.setdefault("configs", []).append(cfg)
        return SimpleNamespace(evaluated=[], pareto=[], hypervolume=[0.0, 0.0], seconds=0.0)

    monkeypatch.setattr(search.driver, "run_search_cli", fake_search)
    monkeypatch.setattr(compressor.elastic.modeldir, "load_model", lambda *_, **__: None)
    info = pipe.run_stage("search")  # compress's search stage

    dirs = [str(tmp_path / f"pred-{p}") for p in precisions]
    fake = {d: SimpleNamespace(group={"precision": p, "engine": "onnxruntime"}) for d, p in zip(dirs, precisions)}
    monkeypatch.setattr(search.driver, "load_predictors", lambda *_, **__: fake)
    monkeypatch.setattr(nasprune.cli, "load_for_cli", lambda *_: None)
    args = ["search", "m", "--data", "v.txt", "--out", str(tmp_path / "s"), "--store", str(run / "profiles.sqlite")]
    for d in dirs:
        args += ["--predictor", d]
    r = CliRunner().invoke(nasprune.cli.app, args)
    assert r.exit_code == 0, r.output
    stage_cfg, cli_cfg = searched["configs"]
    assert stage_cfg.precisions == cli_cfg.precisions == precisions[:2]
    assert info["not_faster_than_fp32"] == {slow: 1.04} and f"{slow} left out of the search" in r.output
