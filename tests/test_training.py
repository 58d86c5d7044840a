from dataclasses import asdict

import numpy as np
import pytest
import torch

from compressor.core.data import TokenizedData
from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import LoadedModel, ModelMeta
from compressor.elastic.supernet import SuperNetwork
from compressor.recovery.sampling import CalibrateMagSampler, ParamBins, mean_abs_weight
from compressor.recovery.train import STRATEGIES, TrainConfig, Trainer
from tests.conftest import TINY_SPACE, make_tiny


def _loaded(name="llama-gqa"):
    return LoadedModel(make_tiny(name), None, ModelMeta(search_space=asdict(TINY_SPACE)), None, "tiny")


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (16, 16), generator=g)
    return TokenizedData(ids, ids.clone(), torch.ones_like(ids), "text", "random")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_updates_shared_weights(strategy, tmp_path):
    tr = Trainer(_loaded(), _data(), TrainConfig(strategy=strategy, steps=2, num_bins=3, calib_candidates=4), tmp_path)
    w = tr.supernet.model.model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    tr.run(progress=False)
    assert (w - before).abs().max() > 0
    assert len(tr.sandwich()) == (1 if strategy == "standard" else 3)


def test_sandwich_includes_largest_and_smallest(tmp_path):
    tr = Trainer(_loaded(), _data(), TrainConfig(strategy="grid-params", steps=1, num_bins=3), tmp_path)
    subs = tr.sandwich()
    assert subs[0] == tr.supernet.space.largest() and subs[-1] == tr.supernet.space.smallest()


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    cfg = TrainConfig(strategy="importance-grid-params", steps=6, num_bins=3, checkpoint_every=3)
    full = Trainer(_loaded(), _data(), cfg, tmp_path / "a")
    full.run(progress=False)
    first = Trainer(_loaded(), _data(), TrainConfig(**{**asdict(cfg), "steps": 3}), tmp_path / "b")
    first.run(progress=False)  # "killed" after step 3: only its checkpoint survives
    resumed = Trainer(_loaded(), _data(), cfg, tmp_path / "b")
    resumed.load_checkpoint()
    assert resumed.step == 3
    resumed.run(progress=False)
    for p, q in zip(full.supernet.model.parameters(), resumed.supernet.model.parameters()):
        assert torch.equal(p, q)


def test_resume_with_other_settings_is_refused(tmp_path):
    Trainer(_loaded(), _data(), TrainConfig(strategy="random", steps=1), tmp_path).run(progress=False)
    other = Trainer(_loaded(), _data(), TrainConfig(strategy="random", steps=2, lr=1e-3), tmp_path)
    with pytest.raises(NaspruneError, match="lr"):
        other.load_checkpoint()


@pytest.mark.parametrize("untie", [False, True])
def test_lora_supernet_merges_to_plain_model_equal_to_unmerged(untie, tmp_path):
    loaded = _loaded()
    emb = loaded.model.model.embed_tokens.weight.detach().clone()
    tr = Trainer(
        loaded, _data(), TrainConfig(strategy="random", steps=2, lora=True, lr=1e-2, untie_lm_head=untie), tmp_path
    )
    tr.run(progress=False)
    assert ("lm_head" in tr.lora_targets) == untie
    for n, p in tr.supernet.model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # make the adapters matter
    sn, ids = tr.supernet.eval(), _data().input_ids[:2]
    small = sn.space.smallest()
    with torch.no_grad():
        full_unmerged = sn(ids)
        with sn.selected(small):
            small_unmerged = sn(ids)
    merged = tr.finished_model()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    again = SuperNetwork(merged, TINY_SPACE)
    with torch.no_grad():
        assert (merged(ids).logits - full_unmerged).abs().max() <= 1e-4
        with again.selected(small):
            assert (again(ids) - small_unmerged).abs().max() <= 1e-4
    assert torch.equal(merged.model.embed_tokens.weight, emb)  # the tied embedding never changes under LoRA


def test_mean_abs_weight_matches_brute_force():
    from compressor.elastic.extract import extract

    sn = SuperNetwork(make_tiny("phi3"), TINY_SPACE, layer_ranking=[3, 1, 0, 2])
    rng = np.random.default_rng(0)
    subs = [sn.space.sample(rng) for _ in range(4)]
    fast = mean_abs_weight(sn, subs)
    for sub, value in zip(subs, fast):
        model = extract(sn, sub)
        params = torch.cat([p.detach().abs().flatten() for p in model.parameters()])
        assert value == pytest.approx(params.mean().item(), rel=1e-5)


def test_calibrate_mag_keeps_highest_mean_magnitude_per_bin():
    sn = SuperNetwork(make_tiny("llama-gqa"), TINY_SPACE)
    sampler = CalibrateMagSampler(sn.space, seed=0, num_bins=4, candidates=6, supernet=sn)
    for ranked, kept in zip(sampler.candidate_scores, sampler.bins.members):
        if ranked:
            assert kept == [ranked[0][0]] and ranked[0][1] == max(v for _, v in ranked)
    bins = ParamBins.build(sn.space, 4)
    drawn = sampler.sample_many(40)
    counts = np.histogram([sn.space.num_params(s) for s in drawn], bins=bins.edges)[0]
    assert (counts[counts > 0] == counts[counts > 0][0]).all()  # flat over the non-empty bins
