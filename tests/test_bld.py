"""Block-local distillation: all widths of all blocks from cached teacher activations."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from compressor.elastic.modeldir import ModelMeta, save_model_dir
from compressor.elastic.search_space import SubNetwork
from compressor.recovery.bld import (
    BlockDistillConfig,
    block_loss,
    cache_teacher_activations,
    distill_blocks,
    train_block,
)
from tests.conftest import TINY_SPACE, make_tiny


@pytest.fixture
def tiny_dir(tmp_path):
    model = make_tiny("llama-gqa")
    return save_model_dir(model, None, ModelMeta(search_space=asdict(TINY_SPACE)), tmp_path / "m")


def _windows(n=8, t=16, vocab=96, seed=0):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_full_width_loss_is_zero_at_initialization(tiny_dir, tmp_path):
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.bld import _open

    sn = load_model(str(tiny_dir)).supernet()
    acts = tmp_path / "acts"
    cache_teacher_activations(sn, _windows(), acts)
    largest = sn.space.largest()
    for i in range(len(sn.family.layers(sn.model))):
        x = torch.from_numpy(_open(acts, i)[:4].astype("float32"))
        t = torch.from_numpy(_open(acts, i + 1)[:4].astype("float32"))
        with torch.no_grad():
            assert float(block_loss(sn, i, x, t, largest)) < 1e-5  # the student is the teacher (fp16 cache)


def test_narrow_widths_learn(tiny_dir, tmp_path):
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.bld import _open

    sn = load_model(str(tiny_dir)).supernet()
    acts = tmp_path / "acts"
    cache_teacher_activations(sn, _windows(n=16), acts)
    s = sn.space
    small = s.smallest()
    x = torch.from_numpy(_open(acts, 1)[:8].astype("float32"))
    t = torch.from_numpy(_open(acts, 2)[:8].astype("float32"))
    with torch.no_grad():
        before = float(block_loss(sn, 1, x, t, small))
    report = train_block(sn, 1, acts, BlockDistillConfig(steps=60, batch_size=4, seq_len=16, tokens=64, lr=3e-3))
    with torch.no_grad():
        after = float(block_loss(sn, 1, x, t, small))
    assert after < 0.8 * before, (before, after)
    assert report["loss_last"] < report["loss_first"]


@pytest.mark.slow
def test_blocks_in_two_processes_equal_one_process(tiny_dir, tmp_path):
    cfg = dict(steps=5, batch_size=2, seq_len=16, tokens=64, lr=1e-3, seed=3, threads=1)
    threads = torch.get_num_threads()
    one, _ = distill_blocks(
        str(tiny_dir), _windows(), tmp_path / "w1", BlockDistillConfig(processes=1, **cfg), log=lambda *_: None
    )
    assert torch.get_num_threads() == threads  # the in-process worker's thread count does not leak
    two, report = distill_blocks(
        str(tiny_dir), _windows(), tmp_path / "w2", BlockDistillConfig(processes=2, **cfg), log=lambda *_: None
    )
    a, b = one.model.state_dict(), two.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(report["blocks"]) == 4


def test_distill_blocks_command_reruns_with_overwrite(tiny_model, tmp_path):
    """The CLI writes OUT and its own work dir OUT.blocks; a rerun with --overwrite reuses that work dir."""
    from typer.testing import CliRunner

    from compressor.core.data import PACKAGE_DATA
    from nasprune.cli import app

    data = tmp_path / "d.txt"
    data.write_text((PACKAGE_DATA / "northanger_abbey.txt").read_text()[:20_000])
    args = [
        "distill-blocks",
        str(tiny_model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "b"),
        "--steps",
        "2",
        "--tokens",
        "256",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
    ]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0


# ---- one chosen sub-network (refine --block-steps) ------------------------------------------
def _held_out_block_losses(teacher, student_model, kept, windows) -> list[float]:
    """Teacher-forced normalized MSE of every student block on ``windows`` (the loss BLD trains)."""
    from compressor.elastic.supernet import SuperNetwork
    from compressor.recovery.bld import teacher_residuals
    from compressor.recovery.distill_states import teacher_layer_targets

    depth = len(teacher.family.layers(teacher.model))
    targets = [t + 1 for t in teacher_layer_targets(kept, depth)]
    states = teacher_residuals(teacher, windows, set(kept) | set(targets))
    student = SuperNetwork(student_model)
    with torch.no_grad():
        return [
            float(block_loss(student, j, states[i], states[t], student.space.largest()))
            for j, (i, t) in enumerate(zip(kept, targets))
        ]


def test_chosen_blocks_of_the_parent_itself_have_zero_loss_and_stay_put(tiny_dir):
    """The largest sub-network is the teacher: every block's loss is zero and BLD leaves its weights as they were."""
    from compressor.elastic.extract import extract
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.bld import distill_chosen_blocks

    teacher = load_model(str(tiny_dir)).supernet().eval()
    largest = teacher.space.largest()
    student = extract(teacher, largest)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = distill_chosen_blocks(student, teacher, teacher.space.kept_layers(largest), _windows(), steps=5, lr=1e-2)
    assert all(b["loss_first"] < 1e-9 and b["loss_last"] < 1e-9 for b in report["blocks"])
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert [b["target_state"] for b in report["blocks"]] == [i + 1 for i in teacher.space.kept_layers(largest)]


def test_chosen_blocks_learn_on_held_out_windows_and_absorb_dropped_layers(tiny_dir):
    """A narrower, shallower student: each block is trained towards the teacher's stream before the parent's
    next kept layer, so the last kept block of a cut stack targets the parent's last state; on windows it
    never saw, the teacher-forced block losses fall."""
    from compressor.elastic.extract import extract
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.bld import distill_chosen_blocks

    teacher = load_model(str(tiny_dir)).supernet().eval()
    c = teacher.space.choices
    sub = SubNetwork(c["embed_dim"][0], c["num_heads"][0], c["ffn_dim"][0], c["num_layers"][0])
    kept = teacher.space.kept_layers(sub)
    depth = len(teacher.family.layers(teacher.model))
    assert len(kept) < depth
    student = extract(teacher, sub)
    held = _windows(n=8, seed=1)
    before = _held_out_block_losses(teacher, student, kept, held)
    report = distill_chosen_blocks(student, teacher, kept, _windows(n=16), steps=40, lr=3e-3, batch_size=4)
    after = _held_out_block_losses(teacher, student, kept, held)
    assert report["blocks"][-1]["target_state"] == depth  # the last block stands in for every layer after it
    assert sum(after) < 0.8 * sum(before), (before, after)
    assert all(b["loss_last"] < b["loss_first"] for b in report["blocks"])


def test_refine_with_block_steps_spends_its_time_from_the_budget(tiny_model, tmp_path):
    """refine --block-steps: BLD runs after repair, is recorded with its own perplexity, and its minutes come
    off the KD budget; wrong settings are refused in one line."""
    from compressor.core.data import PACKAGE_DATA
    from compressor.core.errors import NaspruneError
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.refine import RefineConfig, _after_blocks, refine

    train = tmp_path / "train.txt"
    train.write_text((PACKAGE_DATA / "northanger_abbey.txt").read_text()[:30_000])
    val = tmp_path / "val.txt"
    val.write_text((PACKAGE_DATA / "northanger_abbey.txt").read_text()[100_000:110_000])
    space = load_model(str(tiny_model)).supernet().space
    sub = SubNetwork(space.choices["embed_dim"][0], space.choices["num_heads"][0], space.choices["ffn_dim"][0], 3)
    cfg = RefineConfig(
        minutes=0.2,
        steps=4,
        batch_size=2,
        seq_len=32,
        repair_tokens=256,
        eval_tokens=64,
        block_steps=8,
        block_tokens=512,
        block_lr=3e-3,
    )
    record = refine(
        str(tiny_model),
        sub,
        str(train),
        tmp_path / "r",
        cfg,
        validation=str(val),
        log=lambda *_: None,
        teacher_cache_dir=tmp_path / "teacher",
    )
    bld = record["block_distillation"]
    assert bld["steps"] == 8 and len(bld["blocks"]) == 3 and bld["seconds"] > 0
    assert record["ppl_blocks"] is not None and record["ppl_refined"] is not None
    assert _after_blocks(cfg, record).minutes == pytest.approx(max(0.02, 0.2 - bld["seconds"] / 60))
    assert _after_blocks(cfg, {}).minutes == 0.2
    for bad in ({"block_steps": -1}, {"block_steps": 1.5}, {"block_lr": 0.0}, {"block_tokens": 0}):
        with pytest.raises(NaspruneError, match="refine block_"):
            RefineConfig(**bad)
