"""Closed-form repair (bias compensation + ridge refit) of extracted sub-networks."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from compressor.elastic.modeldir import LoadedModel, ModelMeta, save_model_dir
from compressor.elastic.search_space import SubNetwork
from compressor.recovery.repair import RepairConfig, repair_model
from tests.conftest import TINY_SPACE, make_tiny


def _loaded(name: str) -> LoadedModel:
    from dataclasses import asdict

    model = make_tiny(name)
    return LoadedModel(model, None, ModelMeta(search_space=asdict(TINY_SPACE)), None, name)


def _fewest_heads_and_neurons(loaded) -> SubNetwork:
    """Full width and depth, the fewest heads and FFN neurons: only what repair's projections fix is pruned."""
    space = loaded.supernet().space
    return SubNetwork(
        space.choices["embed_dim"][-1],
        space.choices["num_heads"][0],
        space.choices["ffn_dim"][0],
        space.choices["num_layers"][-1],
    )


def _windows(seed=0, n=8, t=32, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, t), generator=g)


def _loss(model, windows) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def _kl_to_teacher(teacher, student, windows) -> float:
    with torch.no_grad():
        t = teacher(input_ids=windows, use_cache=False).logits.log_softmax(-1)
        s = student(input_ids=windows, use_cache=False).logits.log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_repair_is_exact_when_nothing_is_removed():
    loaded = _loaded("llama-gqa")
    largest = loaded.supernet().space.largest()
    cfg = RepairConfig(tokens=256, seq_len=32)
    model, report = repair_model(loaded, largest, _windows(), cfg)
    w = _windows(seed=1)
    with torch.no_grad():
        ref = loaded.model(input_ids=w, use_cache=False).logits
        got = model(input_ids=w, use_cache=False).logits
    assert (ref - got).abs().max() < 1e-3
    assert all(p.rel_error_before < 1e-10 for p in report.projections)


def test_repair_never_increases_calibration_error_and_helps_the_pruned_model():
    loaded = _loaded("llama-gqa")
    space = loaded.supernet().space
    sub = SubNetwork(
        embed_dim=space.choices["embed_dim"][-1],
        num_heads=space.choices["num_heads"][0],
        ffn_dim=space.choices["ffn_dim"][0],
        num_layers=space.choices["num_layers"][-1],
    )
    calib = _windows(n=16)
    model, report = repair_model(loaded, sub, calib, RepairConfig(tokens=512, seq_len=32))
    assert report.bias  # Llama's config can declare the compensation biases
    for p in report.projections:
        assert p.fit_error_after <= p.fit_error_before + 1e-9, p
    from compressor.elastic.extract import extract

    plain = extract(loaded.supernet(), sub)
    test = _windows(seed=7, n=8)
    assert _kl_to_teacher(loaded.model, model, test) < _kl_to_teacher(loaded.model, plain, test)


def test_repaired_checkpoint_loads_in_plain_transformers(tmp_path):
    loaded = _loaded("llama-gqa")
    space = loaded.supernet().space
    sub = SubNetwork(
        space.choices["embed_dim"][0],
        space.choices["num_heads"][0],
        space.choices["ffn_dim"][0],
        space.choices["num_layers"][0],
    )
    model, _ = repair_model(loaded, sub, _windows(n=16), RepairConfig(tokens=512, seq_len=32))
    path = save_model_dir(model, None, ModelMeta(), tmp_path / "repaired")
    again = AutoModelForCausalLM.from_pretrained(path).eval()
    assert again.config.attention_bias and again.config.mlp_bias
    w = _windows(seed=3)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=w).logits, model(input_ids=w).logits, atol=1e-5)


def test_families_without_bias_fields_refit_weights_only():
    loaded = _loaded("qwen2")
    sub = _fewest_heads_and_neurons(loaded)
    model, report = repair_model(loaded, sub, _windows(n=16), RepairConfig(tokens=512, seq_len=32))
    assert not report.bias and all(p.choice != "bias" for p in report.projections)
    assert all(p.fit_error_after <= p.fit_error_before + 1e-9 for p in report.projections)


def test_qwen3_is_repaired_weights_only():
    from dataclasses import asdict

    from tests.test_architectures_families import family_configs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_configs()["qwen3"]).eval()
    loaded = LoadedModel(model, None, ModelMeta(search_space=asdict(TINY_SPACE)), None, "qwen3")
    sub = _fewest_heads_and_neurons(loaded)
    repaired, report = repair_model(loaded, sub, _windows(n=16), RepairConfig(tokens=512, seq_len=32))
    assert not report.bias and report.projections
    assert all(p.fit_error_after <= p.fit_error_before + 1e-9 for p in report.projections)
    from compressor.elastic.extract import extract

    plain = extract(loaded.supernet(), sub)
    test = _windows(seed=7, n=8)
    assert _kl_to_teacher(loaded.model, repaired, test) < _kl_to_teacher(loaded.model, plain, test)
