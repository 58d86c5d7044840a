"""Refine: one extracted sub-network distilled on its own from the unpruned parent."""

from __future__ import annotations

import json

import torch

from compressor.core.data import PACKAGE_DATA
from compressor.elastic.evaluate import token_windows
from compressor.elastic.extract import extract
from compressor.elastic.modeldir import load_model
from compressor.elastic.search_space import SubNetwork
from compressor.recovery.refine import RefineConfig, refine


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
    assert record["repair_seconds"] > 0  # the manifest prices repair next to training (issue 11's minutes)
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
    import compressor.recovery.train as train_module
    from compressor.recovery.refine import missing_teacher_windows, planned_steps

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


def test_state_targets_map_each_student_block_to_the_parent_state_its_next_block_reads():
    """Student block j replaces the parent's layers kept[j] .. kept[j+1]-1: its target is the parent's output
    just before the next kept layer; the last block's is the parent's last layer (as the logit KD's)."""
    import pytest

    from compressor.recovery.distill_states import teacher_layer_targets

    assert teacher_layer_targets([0, 1, 2, 3], 4) == [0, 1, 2, 3]  # full depth: block for block
    assert teacher_layer_targets([0, 2, 3, 6], 8) == [1, 2, 5, 7]
    assert teacher_layer_targets([1, 4], 5) == [3, 4]
    for bad in ([], [2, 1], [0, 0], [0, 5]):
        with pytest.raises(ValueError):
            teacher_layer_targets(bad, 5)


def test_state_loss_is_zero_for_the_parent_itself_and_positive_for_a_pruned_student(tiny_model):
    """The full-depth, full-width student is the teacher: zero state loss; a shallower, narrower one is not.
    Only the student's first embed_dim channels of the parent's stream are compared."""
    from compressor.recovery.distill_states import state_loss, teacher_layer_targets, teacher_states

    parent = load_model(str(tiny_model))
    teacher = parent.supernet().eval()
    ids = torch.randint(0, parent.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    depth = parent.model.config.num_hidden_layers
    full = list(range(depth))
    wanted = teacher_states(teacher, ids, None, teacher_layer_targets(full, depth))
    states: list = []
    with torch.no_grad():
        parent.supernet().eval()(ids, states=states)
    assert float(state_loss(states, wanted, None)) < 1e-10
    space = teacher.space
    sub = SubNetwork(space.choices["embed_dim"][0], space.choices["num_heads"][0], space.choices["ffn_dim"][0], 3)
    student = extract(teacher, sub).eval()
    kept = space.kept_layers(sub)
    wanted = teacher_states(teacher, ids, None, teacher_layer_targets(kept, depth))
    states = []
    with torch.no_grad():
        from compressor.elastic.supernet import SuperNetwork

        SuperNetwork(student).eval()(ids, states=states)
    assert len(states) == 3 and states[0].shape[-1] == sub.embed_dim < wanted[0].shape[-1]
    assert float(state_loss(states, wanted, None)) > 1e-3
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True  # masked positions do not count
    s2 = [s.clone() for s in states]
    for s in s2:
        s[:, 4:] += 100.0
    assert abs(float(state_loss(s2, wanted, mask)) - float(state_loss(states, wanted, mask))) < 1e-5


def test_refine_with_state_distillation_lowers_the_state_loss(tiny_model, tmp_path):
    """refine --distill-states: the parent's blocks run live (timed into the plan), the state loss is logged,
    and on held-out text the refined student's states are closer to the parent's than before, and closer
    than after the same logits-only refine. Anything but single-student logit KD is refused."""
    import pytest

    from compressor.core.errors import NaspruneError
    from compressor.elastic.supernet import SuperNetwork
    from compressor.recovery.distill_states import state_loss, teacher_layer_targets, teacher_states
    from compressor.recovery.train import TrainConfig

    text = (PACKAGE_DATA / "northanger_abbey.txt").read_text()
    train = tmp_path / "train.txt"
    train.write_text(text[:60_000])
    parent = load_model(str(tiny_model))
    teacher = parent.supernet().eval()
    held = token_windows(parent.tokenizer, text[200_000:230_000], 32, 1024)
    space = teacher.space
    sub = SubNetwork(space.choices["embed_dim"][-1], space.choices["num_heads"][-1], space.choices["ffn_dim"][0], 3)

    def held_out_state_loss(path) -> float:
        student = load_model(str(path))
        kept = student.meta.subnetwork["kept_layers"]
        wanted = teacher_states(teacher, held, None, teacher_layer_targets(kept, parent.model.config.num_hidden_layers))
        states: list = []
        with torch.no_grad():
            SuperNetwork(student.model).eval()(held, states=states)
        return float(state_loss(states, wanted, None))

    runs = {}
    for weight in (50.0, 0.0):
        cfg = RefineConfig(
            minutes=2.0,
            steps=60,
            batch_size=4,
            seq_len=32,
            lr=3e-3,
            repair=False,
            eval_tokens=64,
            distill_states=weight,
        )
        out = tmp_path / f"refined-{weight:g}"
        runs[weight] = refine(
            str(tiny_model), sub, str(train), out, cfg, log=lambda *_: None, teacher_cache_dir=tmp_path / "teacher"
        )
    assert runs[50.0]["state_teacher_seconds_timed"] > 0 and "state_teacher_seconds_timed" not in runs[0.0]
    log = [json.loads(line) for line in (tmp_path / "refined-50" / "train_log.jsonl").read_text().splitlines()]
    assert all(r.get("state_losses") for r in log)
    before = held_out_state_loss(tmp_path / "refined-50.student")
    with_states, logits_only = held_out_state_loss(tmp_path / "refined-50"), held_out_state_loss(tmp_path / "refined-0")
    assert with_states < 0.9 * before and with_states < 0.9 * logits_only, (before, with_states, logits_only)
    with pytest.raises(NaspruneError, match="distill_states needs distill 'logits'"):
        TrainConfig(strategy="importance-random", distill="logits", distill_states=1.0)


def test_refine_cli_quantization_trains_with_the_recipe_simulated(tiny_model, tmp_path, monkeypatch):
    """``nasprune refine --quantization int8-pc``: quantization-aware refine of a point that will ship at
    that precision (e.g. a KD-refined model, its largest sub-network, distilled again from the original):
    the recipe reaches the training config, and the quantized validation perplexity is reported. On a
    host whose engine would saturate that recipe (AVX2 without VNNI, planted) it trains but warns."""
    from typer.testing import CliRunner

    import compressor.quant.quantize
    from nasprune.cli import app

    monkeypatch.setattr(compressor.quant.quantize, "cpu_flags", lambda: {"avx2"})

    text = (PACKAGE_DATA / "northanger_abbey.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:20_000])
    (tmp_path / "val.txt").write_text(text[200_000:210_000])
    arch = json.dumps(load_model(str(tiny_model)).supernet().space.largest().to_dict())
    out = tmp_path / "qat"
    args = ["refine", str(tiny_model), "--arch", arch, "--data", str(tmp_path / "train.txt"), "--out", str(out)]
    args += ["--validation", str(tmp_path / "val.txt"), "--quantization", "int8-pc", "--no-repair", "--steps", "2"]
    args += ["--batch-size", "2", "--seq-len", "32"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "refined_quantized" in r.output
    assert "warning:" in r.output and "int8-pc7" in r.output
    refined = load_model(str(out))
    assert refined.meta.provenance["training"]["config"]["quantization"] == "int8-pc"
    record = refined.meta.subnetwork["refine"]
    assert record["config"]["quantization"] == "int8-pc" and record["training"]["steps"] == 2
    assert record["ppl_refined_quantized"] > 1 and record["ppl_one_shot_quantized"] > 1
