"""Block-local distillation: all widths of all blocks from cached teacher activations."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from compressor.bld import BlockDistillConfig, block_loss, cache_teacher_activations, distill_blocks, train_block
from compressor.modeldir import ModelMeta, save_model_dir
from tests.conftest import TINY_SPACE, make_tiny


@pytest.fixture
def tiny_dir(tmp_path):
    model = make_tiny("llama-gqa")
    return save_model_dir(model, None, ModelMeta(search_space=asdict(TINY_SPACE)), tmp_path / "m")


def _windows(n=8, t=16, vocab=96, seed=0):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_full_width_loss_is_zero_at_initialization(tiny_dir, tmp_path):
    from compressor.bld import _open
    from compressor.modeldir import load_model

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
    from compressor.bld import _open
    from compressor.modeldir import load_model

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

    from compressor.data import PACKAGE_DATA
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
