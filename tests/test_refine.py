"""Refine: one extracted sub-network distilled on its own from the unpruned parent."""

from __future__ import annotations

import json

import torch

from compressor.data import PACKAGE_DATA
from compressor.evaluate import token_windows
from compressor.extract import extract
from compressor.modeldir import load_model
from compressor.refine import RefineConfig, refine
from compressor.search_space import SubNetwork


def _kl(teacher, student, windows) -> float:
    with torch.no_grad():
        t = teacher(input_ids=windows, use_cache=False).logits.log_softmax(-1)
        s = student(input_ids=windows, use_cache=False).logits.log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_refine_moves_a_planted_student_towards_its_parent(tiny_model, tmp_path):
    """The parent is a tiny random Llama (the 'planted' function); its pruned sub-network is far from it.
    A few refine steps (repair + KD from the cached parent logits) must bring it closer on unseen text."""
    train = tmp_path / "train.txt"
    text = (PACKAGE_DATA / "northanger_abbey.txt").read_text()
    train.write_text(text[:60_000])
    parent = load_model(str(tiny_model))
    space = parent.supernet().space
    sub = SubNetwork(
        space.choices["embed_dim"][0],
        space.choices["num_heads"][0],
        space.choices["ffn_dim"][0],
        space.choices["num_layers"][0],
    )
    held = token_windows(parent.tokenizer, text[200_000:230_000], 32, 1024)
    before = _kl(parent.model, extract(parent.supernet(), sub), held)

    cfg = RefineConfig(minutes=2.0, steps=30, batch_size=4, seq_len=32, lr=3e-3, repair_tokens=512, eval_tokens=256)
    out = tmp_path / "refined"
    record = refine(
        str(tiny_model), sub, str(train), out, cfg, log=lambda *_: None, teacher_cache_dir=tmp_path / "teacher"
    )
    refined = load_model(str(out))
    after = _kl(parent.model, refined.model, held)
    assert after < 0.8 * before, (before, after)
    assert record["training"]["steps"] == 30
    meta = json.loads((out / "nasprune.json").read_text())
    assert meta["subnetwork"]["arch"] == sub.to_dict() and meta["subnetwork"]["refine"]["arch"] == sub.to_dict()
    assert (tmp_path / "refined.student" / "nasprune.json").exists()
    # the refined checkpoint is the sub-network's shape (plus repair biases), loadable without nasprune
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.hidden_size == sub.embed_dim and plain.config.num_hidden_layers == sub.num_layers


def test_refine_plans_its_steps_from_the_budget_and_loads_the_teacher_once(tiny_model, tmp_path, monkeypatch):
    """The step count (cosine schedule, teacher-cache windows) comes from the minutes budget and a timed
    step, not the 100,000 cap; training gets the teacher refine already holds instead of loading it again."""
    import compressor.train as train_module
    from compressor.refine import missing_teacher_windows, planned_steps

    train = tmp_path / "train.txt"
    train.write_text((PACKAGE_DATA / "northanger_abbey.txt").read_text()[:30_000])
    loads = []
    real = train_module.load_model
    monkeypatch.setattr(train_module, "load_model", lambda spec, **kw: loads.append(str(spec)) or real(spec, **kw))
    space = load_model(str(tiny_model)).supernet().space
    sub = SubNetwork(space.choices["embed_dim"][0], space.choices["num_heads"][0], space.choices["ffn_dim"][0], 3)
    cfg = RefineConfig(minutes=0.05, batch_size=2, seq_len=32, repair=False, eval_tokens=64)
    out = tmp_path / "refined"
    record = refine(
        str(tiny_model), sub, str(train), out, cfg, log=lambda *_: None, teacher_cache_dir=tmp_path / "teacher"
    )
    assert loads == [str(tmp_path / "refined.student")]  # the student only
    # the empty cache's fill is paid from the budget: fewer steps than the student's time alone affords
    assert record["teacher_fill_planned_seconds"] > 0
    assert record["steps_planned"] < planned_steps(cfg, record["step_seconds_timed"]) < cfg.steps
    assert 1 <= record["training"]["steps"] <= record["steps_planned"]
    # the plan priced the very cache the run filled (same key): nothing of the planned steps is missing now
    teacher = load_model(str(tiny_model))
    missing = missing_teacher_windows(teacher, str(train), cfg.train_config(), tmp_path / "teacher", False)
    assert missing(record["steps_planned"]) == 0
    empty = missing_teacher_windows(teacher, str(train), cfg.train_config(), tmp_path / "empty", False)
    assert empty(record["steps_planned"]) > 0
    assert planned_steps(RefineConfig(minutes=1.0, steps=50), 0.5) == 50  # the cap still bounds it
    assert planned_steps(RefineConfig(minutes=1.0), 0.5) == 150  # 60 s / 0.5 s x 1.25 margin
    # 1 s per uncached window, 2 new windows a step: 0.4 s + 2 s per step -> 25 steps in 60 s
    assert planned_steps(RefineConfig(minutes=1.0), 0.5, window_seconds=1.0, missing=lambda n: 2 * n) == 25
    assert planned_steps(RefineConfig(minutes=1.0), 0.5, window_seconds=1.0, missing=lambda n: 0) == 150


def test_cross_entropy_refine_runs_no_teacher(tiny_model, tmp_path):
    """``distill_alpha`` 0 is the equal-minutes control for KD: plain cross-entropy, no teacher forward,
    nothing cached, no fill priced into the plan."""
    train = tmp_path / "train.txt"
    train.write_text((PACKAGE_DATA / "northanger_abbey.txt").read_text()[:20_000])
    space = load_model(str(tiny_model)).supernet().space
    sub = SubNetwork(space.choices["embed_dim"][0], space.choices["num_heads"][0], space.choices["ffn_dim"][0], 3)
    cfg = RefineConfig(minutes=0.03, batch_size=2, seq_len=32, repair=False, eval_tokens=64, distill_alpha=0.0)
    record = refine(
        str(tiny_model), sub, str(train), tmp_path / "ce", cfg, log=lambda *_: None, teacher_cache_dir=tmp_path / "t"
    )
    assert record["teacher_fill_planned_seconds"] == 0 and record["training"]["steps"] >= 1
    assert not (tmp_path / "t").exists()
    assert load_model(str(tmp_path / "ce")).meta.provenance["training"]["config"]["distill"] == "none"
