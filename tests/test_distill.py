"""Recovery by distillation: KD losses, the on-disk teacher cache, in-place KD, trainer integration."""

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.core.data import IGNORE, TokenizedData
from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import LoadedModel, ModelMeta
from compressor.recovery.distill import (
    TeacherCache,
    inplace_targets,
    kd_loss,
    kd_loss_full,
    state_dict_hash,
    topk_targets,
)
from compressor.recovery.train import TrainConfig, Trainer
from compressor.recovery.train_config import batch_indices, windows_needed
from tests.conftest import TINY_SPACE, make_tiny


def _loaded(name="llama-gqa"):
    return LoadedModel(make_tiny(name), None, ModelMeta(search_space=asdict(TINY_SPACE)), None, "tiny")


def _data(n=16, seq=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (n, seq), generator=g)
    return TokenizedData(ids, ids.clone(), torch.ones_like(ids), "text", "random")


def _cfg(**kw):
    base = dict(strategy="importance-grid-params", steps=2, num_bins=3, distill="logits", distill_topk=8)
    return TrainConfig(**{**base, **kw})


# ---- losses -------------------------------------------------------------------------------------


def test_kd_loss_equals_hand_computation():
    teacher = [0.5, 0.2, 0.1, 0.12, 0.08]  # top-2 = ids 0, 1; tail mass 0.3
    z = [1.0, -0.5, 0.3, 2.0, -1.0]
    T = 2.0
    q = [math.exp(v / T) for v in z]
    q = [v / sum(q) for v in q]
    expected = (
        T * T * (0.5 * math.log(0.5 / q[0]) + 0.2 * math.log(0.2 / q[1]) + 0.3 * math.log(0.3 / (q[2] + q[3] + q[4])))
    )
    student = torch.tensor([[z, [50.0, 0, 0, 0, 0]]])  # the second token is masked out
    idx = torch.tensor([[[0, 1], [4, 3]]])
    top = torch.tensor([[[math.log(teacher[0]), math.log(teacher[1])], [float("nan"), 0.0]]])
    tail = torch.tensor([[math.log(sum(teacher[2:])), 123.0]])
    mask = torch.tensor([[True, False]])
    assert kd_loss(student, idx, top, tail, mask, T).item() == pytest.approx(expected, rel=1e-6)
    # two copies of the valid token average to the same value
    both = kd_loss(student[:, [0, 0]], idx[:, [0, 0]], top[:, [0, 0]], tail[:, [0, 0]], None, T)
    assert both.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_properties():
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(2, 3, 40) * 3, torch.randn(2, 3, 40, requires_grad=True)
    idx, top, tail = topk_targets(t_logits, 6, temperature=1.5)
    # k + 1 outcomes coarsen the distribution: a lower bound of the full KL; exact when k = V
    full = kd_loss_full(s_logits, inplace_targets(t_logits, 1.5), None, 1.5)
    sparse = kd_loss(s_logits, idx, top, tail, None, 1.5)
    assert 0 < sparse.item() <= full.item()
    assert kd_loss(s_logits, *topk_targets(t_logits, 40, 1.5), None, 1.5).item() == pytest.approx(full.item(), rel=1e-5)
    # zero when the student is the teacher
    assert kd_loss(t_logits, idx, top, tail, None, 1.5).abs().item() < 1e-5
    # a teacher (or student) with almost no tail mass stays finite, gradients too
    peaked = t_logits.clone()
    peaked[..., 0] = 80.0
    loss = kd_loss(s_logits * 30, *topk_targets(peaked, 6), None, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_logits.grad).all()
    # no supervised token: zero, but backward still works
    empty = kd_loss(s_logits, idx, top, tail, torch.zeros(2, 3, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0


def test_inplace_targets_are_detached():
    layer = torch.nn.Linear(4, 10)
    teacher_logits = layer(torch.randn(3, 4))
    targets = inplace_targets(teacher_logits, 2.0)
    assert not targets.requires_grad
    student = torch.randn(3, 10, requires_grad=True)
    kd_loss_full(student, targets, None, 2.0).backward()
    assert layer.weight.grad is None and student.grad is not None


# ---- the cache ----------------------------------------------------------------------------------


class CountingTeacher:
    def __init__(self, model, fail_after: int | None = None):
        self.model, self.windows, self.calls, self.fail_after = model, 0, 0, fail_after

    def __call__(self, ids, mask):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.windows += ids.shape[0]
        return self.model(ids, attention_mask=mask).logits


def _cache(root, data, model, **kw):
    return TeacherCache(root, data.input_ids, data.attention_mask, state_dict_hash(model), **{"k": 8, **kw})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_topk_equals_recomputed(dtype, tmp_path):
    model, data = make_tiny("llama-gqa"), _data()
    cache = _cache(tmp_path, data, model, value_dtype=dtype, chunk_windows=4, temperature=2.0)
    cache.ensure(None, CountingTeacher(model), batch_size=3)
    with torch.no_grad():
        idx, top, tail = topk_targets(model(data.input_ids).logits, 8, 2.0)
    got = cache.fetch(np.array([5, 0, 15, 5]))
    pick = torch.tensor([5, 0, 15, 5])
    assert torch.equal(got[0], idx[pick])
    tol = 1e-6 if dtype == "float32" else 2e-3
    torch.testing.assert_close(got[1], top[pick], rtol=tol, atol=tol)
    torch.testing.assert_close(got[2], tail[pick], rtol=1e-6, atol=1e-6)
    assert (cache.dir / "meta.json").exists() and cache.fetch_seconds > 0 and cache.take_fetch_seconds() > 0
    assert cache.take_fetch_seconds() == 0.0


def test_cache_fill_resumes_and_reuse_needs_no_teacher(tmp_path):
    model, data = make_tiny("llama-gqa"), _data()
    killed = CountingTeacher(model, fail_after=3)  # dies in the second chunk (2 batches of 2 per chunk)
    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path, data, model, chunk_windows=4).ensure(None, killed, batch_size=2)
    resumed = CountingTeacher(model)
    cache = _cache(tmp_path, data, model, chunk_windows=4)
    cache.ensure(None, resumed, batch_size=2)
    assert resumed.windows == 16 - 4 and cache.teacher_windows == 12  # chunk 0 was done
    again = CountingTeacher(model)
    cache2 = _cache(tmp_path, data, model, chunk_windows=4)
    cache2.ensure(None, again, batch_size=2)
    assert again.calls == 0 and cache2.teacher_windows == 0
    for a, b in zip(cache.fetch(np.arange(16)), cache2.fetch(np.arange(16))):
        assert torch.equal(a, b)
    # another teacher, k or token set gets another entry
    assert _cache(tmp_path, data, make_tiny("llama-gqa", seed=1), chunk_windows=4).key != cache.key
    assert _cache(tmp_path, data, model, chunk_windows=4, k=4).key != cache.key
    assert _cache(tmp_path, _data(seq=8), model, chunk_windows=4).key != cache.key


def test_cache_only_fills_needed_windows_and_refuses_others(tmp_path):
    model, data = make_tiny("llama-gqa"), _data()
    teacher = CountingTeacher(model)
    cache = _cache(tmp_path, data, model, chunk_windows=4)
    cache.ensure(np.array([1, 9]), teacher, batch_size=4)
    assert teacher.windows == 8
    cache.fetch(np.array([0, 11]))
    with pytest.raises(NaspruneError, match="no targets"):
        cache.fetch(np.array([4]))


def test_cache_never_unpickles(tmp_path):
    model, data = make_tiny("llama-gqa"), _data()
    cache = _cache(tmp_path, data, model)
    cache.ensure(None, CountingTeacher(model))
    np.save(cache.dir / "tail_logprob.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(NaspruneError, match="corrupt"):
        _cache(tmp_path, data, model).ensure(None, CountingTeacher(model))


def test_windows_needed_is_the_union_of_batch_indices():
    for steps, bs, ga, world, n in [(3, 4, 1, 1, 16), (2, 3, 2, 2, 50), (5, 4, 1, 1, 16), (1, 1, 1, 1, 7)]:
        cfg = TrainConfig(steps=steps, batch_size=bs, grad_accum=ga, seed=3)
        union = {
            int(i)
            for s in range(steps)
            for m in range(ga)
            for r in range(world)
            for i in batch_indices(s, m, cfg, n, world, r)
        }
        assert set(windows_needed(cfg, n, world).tolist()) == union


# ---- trainer ------------------------------------------------------------------------------------


def test_trainer_reuses_cache_on_second_run(tmp_path, monkeypatch):
    calls = []
    original = Trainer._teacher_logits
    monkeypatch.setattr(
        Trainer, "_teacher_logits", lambda self, ids, mask: calls.append(len(ids)) or original(self, ids, mask)
    )
    first = Trainer(_loaded(), _data(), _cfg(), tmp_path / "a", teacher_cache_dir=tmp_path / "cache")
    needed = windows_needed(_cfg(), 16)  # only the windows training will read, not the whole data set
    assert sum(calls) == len(needed) == first.teacher_fill["chunks_computed"] < 16
    stats = first.run(progress=False)
    calls.clear()
    second = Trainer(_loaded(), _data(), _cfg(), tmp_path / "b", teacher_cache_dir=tmp_path / "cache")
    assert calls == [] and second.teacher_fill["chunks_computed"] == 0
    second.run(progress=False)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["teacher_seconds"] > 0 and 0 < r["teacher_fraction"] < 1 and r["kd_losses"] for r in log)
    assert set(stats["distill"]) >= {"teacher_fetch_seconds", "step_seconds", "teacher_fraction", "teacher_fill"}


@pytest.mark.parametrize("teacher", ["original", "largest"])
def test_resume_with_distillation_is_bit_identical(teacher, tmp_path):
    cfg = _cfg(teacher=teacher, steps=6, checkpoint_every=3, distill_alpha=0.7, distill_temperature=2.0)
    cache = tmp_path / "cache"
    full = Trainer(_loaded(), _data(), cfg, tmp_path / "a", teacher_cache_dir=cache)
    full.run(progress=False)
    first = Trainer(
        _loaded(), _data(), TrainConfig(**{**asdict(cfg), "steps": 3}), tmp_path / "b", teacher_cache_dir=cache
    )
    first.run(progress=False)
    resumed = Trainer(_loaded(), _data(), cfg, tmp_path / "b", teacher_cache_dir=cache)
    resumed.load_checkpoint()
    if teacher == "original":
        assert resumed.teacher_fill["chunks_computed"] == 0
    resumed.run(progress=False)
    for p, q in zip(full.supernet.model.parameters(), resumed.supernet.model.parameters()):
        assert torch.equal(p, q)


def test_inplace_kd_sends_no_gradient_into_the_largest(tmp_path):
    tr = Trainer(_loaded(), _data(), _cfg(teacher="largest", steps=1, grad_accum=2), tmp_path)
    largest, arrivals = tr.supernet.space.largest(), []
    forward = tr.supernet.forward

    def spy(*args, **kw):
        out = forward(*args, **kw)
        if tr.supernet.active == largest and out.requires_grad:
            out.register_hook(lambda g: arrivals.append(g.abs().sum().item()))
        return out

    tr.supernet.forward = spy
    out = tr.train_step()
    assert len(arrivals) == 2  # once per micro-batch: its own cross-entropy, never the students' KD
    assert str(largest) not in out["kd_losses"] and len(out["kd_losses"]) == 2
    assert all(v > 0 for v in out["kd_losses"].values()) and out["teacher_seconds"] == 0.0


def _smallest_kd(tr: Trainer) -> float:
    sn, cache, data = tr.supernet, tr.teacher_cache, tr.data
    targets = cache.fetch(np.arange(len(data)))
    with torch.no_grad(), sn.selected(sn.space.smallest()):
        logits = sn.eval()(data.input_ids)
    mask = data.labels[:, 1:] != IGNORE
    return kd_loss(logits[:, :-1], *(t[:, :-1] for t in targets), mask, tr.cfg.distill_temperature).item()


def test_distillation_lowers_kd_of_small_subnetwork(tmp_path):
    tr = Trainer(
        _loaded(), _data(), _cfg(steps=12, lr=3e-3, warmup_steps=1), tmp_path, teacher_cache_dir=tmp_path / "c"
    )
    before = _smallest_kd(tr)
    tr.run(progress=False)
    after = _smallest_kd(tr)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("teacher", ["original", "largest"])
def test_lora_distillation_trains_adapters(teacher, tmp_path):
    tr = Trainer(
        _loaded(), _data(), _cfg(teacher=teacher, lora=True, lr=1e-2), tmp_path, teacher_cache_dir=tmp_path / "c"
    )
    before = {n: p.detach().clone() for n, p in tr.supernet.model.named_parameters() if "lora_A" in n}
    stats = tr.run(progress=False)
    assert any(not torch.equal(before[n], p) for n, p in tr.supernet.model.named_parameters() if n in before)
    assert stats["distill"]["teacher_fraction"] >= 0


def test_instruct_data_distills_only_supervised_tokens(tmp_path):
    d = _data()
    labels, mask = d.labels.clone(), torch.ones_like(d.input_ids)
    labels[:, :6] = IGNORE  # prompt
    labels[:, 12:] = IGNORE  # padding
    mask[:, 12:] = 0
    data = TokenizedData(d.input_ids, labels, mask, "instruct", "random")
    tr = Trainer(_loaded(), data, _cfg(), tmp_path, teacher_cache_dir=tmp_path / "c")
    out = tr.train_step()
    assert all(math.isfinite(v) and v > 0 for v in out["kd_losses"].values())


def test_distill_none_keeps_the_old_loss(tmp_path):
    cfg = TrainConfig(strategy="importance-grid-params", steps=2, num_bins=3)
    a = Trainer(_loaded(), _data(), cfg, tmp_path / "a")
    b = Trainer(
        _loaded(), _data(), TrainConfig(**{**asdict(cfg), "distill_alpha": 0.3, "teacher": "largest"}), tmp_path / "b"
    )
    assert a.teacher_cache is None and "kd_losses" not in a.train_step()
    b.train_step()
    for p, q in zip(a.supernet.model.parameters(), b.supernet.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distill": "hidden"}, "distill must be one of none, logits"),
        ({"teacher": "ensemble"}, "teacher must be one of original, largest"),
        ({"distill_alpha": 1.5}, r"distill_alpha must be in \[0, 1\]"),
        ({"distill_alpha": -0.1}, r"distill_alpha must be in \[0, 1\]"),
        ({"distill_topk": 0}, "distill_topk must be an integer >= 1"),
        ({"distill_topk": 2.5}, "distill_topk must be an integer >= 1"),
        ({"distill_temperature": 0.0}, "distill_temperature must be > 0"),
        ({"distill_temperature": float("nan")}, "distill_temperature must be > 0"),
        ({"distill": "logits", "teacher": "largest", "strategy": "standard"}, "needs a sandwich strategy"),
    ],
)
def test_invalid_distill_settings(overrides, message):
    with pytest.raises(NaspruneError, match=message) as e:
        TrainConfig.load(None, overrides)
    assert "\n" not in str(e.value)


def test_topk_larger_than_vocabulary_is_refused(tmp_path):
    with pytest.raises(NaspruneError, match="exceeds the vocabulary"):
        Trainer(_loaded(), _data(), _cfg(distill_topk=500), tmp_path, teacher_cache_dir=tmp_path / "c")


def test_resume_with_other_distill_settings_is_refused(tmp_path):
    Trainer(_loaded(), _data(), _cfg(steps=1), tmp_path, teacher_cache_dir=tmp_path / "c").run(progress=False)
    other = Trainer(_loaded(), _data(), _cfg(steps=2, distill_alpha=0.5), tmp_path, teacher_cache_dir=tmp_path / "c")
    with pytest.raises(NaspruneError, match="distill_alpha"):
        other.load_checkpoint()


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import compressor.recovery.distill
from tests.test_distill import _cfg, _data, _loaded
from compressor.recovery.train import Trainer
compressor.recovery.distill.DEFAULT_CHUNK_WINDOWS = 2
out = {out!r}
tr = Trainer(_loaded(), _data(), _cfg(steps=2, batch_size=2), out + "/work", teacher_cache_dir=out + "/cache")
stats = tr.run(progress=False)
rank = tr.accelerator.process_index
digest = sum(float(p.double().sum()) for p in tr.supernet.model.parameters())
with open(f"{{out}}/rank{{rank}}.json", "w") as f:
    json.dump({{"windows": tr.teacher_cache.teacher_windows, "digest": digest, "stats": stats["distill"]}}, f)
"""


@pytest.mark.slow
def test_two_process_ddp_shards_the_cache_fill(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1]), out=str(tmp_path)))
    # torchrun, not `accelerate launch --cpu` (which starts a single process): accelerate reads its env (gloo on CPU)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 2 steps x 2 ranks x 2 windows = 8 of the 16 windows needed; chunk c (2 windows) filled by rank c % 2
    chunks = np.unique(windows_needed(_cfg(steps=2, batch_size=2), 16, world=2) // 2)
    assert [r["windows"] for r in ranks] == [2 * int((chunks % 2 == rank).sum()) for rank in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas equal
