"""Qwen3, OLMo 2, Gemma 2, Gemma 3 and real sliding-window attention (Mistral, Qwen2, Gemma), on tiny
random configs: the super-network equals HF, permutation preserves the function, extraction is exact
and loads in plain transformers, the ONNX graphs keep the sliding window for prompts > 2x the window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from compressor.core.data import TokenizedData
from compressor.core.errors import NaspruneError
from compressor.elastic.architectures import family_for
from compressor.elastic.extract import extract
from compressor.elastic.importance import compute_importance, permute
from compressor.elastic.supernet import SuperNetwork
from compressor.quant.onnx_export import check_parity, export_graphs
from tests.conftest import TINY_SPACE

WINDOW = 8
SEQ = 3 * WINDOW  # every check runs on sequences longer than 2x the window
COMMON = dict(vocab_size=96, intermediate_size=96, num_hidden_layers=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def family_configs() -> dict:
    gemma = dict(sliding_window=WINDOW, query_pre_attn_scalar=24, **GQA, **COMMON)
    return {
        "mistral-swa": MistralConfig(sliding_window=WINDOW, **GQA, **COMMON),
        "phi3-swa": Phi3Config(sliding_window=WINDOW, **{k: v for k, v in GQA.items() if k != "head_dim"}, **COMMON),
        "qwen2-swa": Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, **GQA, **COMMON),
        "qwen3": Qwen3Config(tie_word_embeddings=True, **GQA, **COMMON),
        "qwen3-untied-swa": Qwen3Config(
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            **GQA,
            **COMMON,
        ),
        "olmo2": Olmo2Config(**GQA, **COMMON),
        # small caps so that soft-capping is active on random weights
        "gemma2": Gemma2Config(attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **gemma),
        "gemma3": Gemma3TextConfig(
            sliding_window_pattern=2,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            **gemma,
        ),
    }


SLIDING = ("mistral-swa", "phi3-swa", "qwen2-swa", "qwen3-untied-swa", "gemma2", "gemma3")


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_configs()[name]).eval()
    with torch.no_grad():  # norms start at 1 (0 for Gemma), biases at 0: perturb so slicing bugs cannot hide
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(family_configs()))
def family(request):
    return request.param


def test_family_is_recognized(family):
    fam = family_for(make(family).config)
    expected = {"mistral-swa": "llama", "phi3-swa": "phi3", "qwen2-swa": "llama", "qwen3-untied-swa": "qwen3"}
    expected = expected.get(family, family)
    assert fam.name == expected


def test_largest_subnetwork_equals_hf(family):
    model = make(family)
    sn = SuperNetwork(model, TINY_SPACE)
    x = ids()
    with torch.no_grad():
        assert (model(x).logits - sn(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_window_is_real_beyond_the_window(name):
    """Exact against HF on 3x the window, while full attention there differs: the window is applied."""
    model = make(name)
    sn = SuperNetwork(model, TINY_SPACE)
    fam = sn.family
    assert "sliding_attention" in fam.layer_types
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        assert (ref - sn(x)).abs().max().item() <= 1e-5
        fam.layer_types = ["full_attention"] * len(fam.layer_types)  # what the old forward did
        assert (ref - sn(x)).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", ("mistral-swa", "gemma2"))
def test_sliding_window_with_padding_keeps_valid_positions_exact(name):
    sn = SuperNetwork(make(name), TINY_SPACE)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 20:] = 0  # right padding
    with torch.no_grad():
        full = sn(x[1:, :20])
        padded = sn(x, attention_mask=mask)[1:, :20]
    assert torch.allclose(full, padded, atol=1e-5)


def test_permutation_preserves_logits(family):
    model = make(family)
    sn = SuperNetwork(model, TINY_SPACE)
    x = ids(6, 16, seed=1)
    data = TokenizedData(x, x.clone(), torch.ones_like(x), "text", "random")
    with torch.no_grad():
        before = model(ids()).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    permute(sn, compute_importance(sn, data, progress=False))
    changed = [n for n, p in model.named_parameters() if not torch.equal(weights[n], p)]
    assert any("norm" in n for n in changed) and any("layers.0.self_attn" in n for n in changed)  # it did reorder
    with torch.no_grad():
        after = model(ids()).logits
        assert (before - after).abs().max().item() <= 1e-4
        assert (sn(ids()) - after).abs().max().item() <= 1e-4


def test_subnetworks_extract_exactly_and_load_in_plain_transformers(family, tmp_path):
    model = make(family)
    sn = SuperNetwork(model, TINY_SPACE, layer_ranking=[2, 0, 3, 1])
    x = ids()
    rng = np.random.default_rng(1)
    subs = [sn.space.smallest()] + [sn.space.sample(rng) for _ in range(3)]
    for sub in subs:
        sn.select(sub)
        small = extract(sn, sub)
        assert sum(p.numel() for p in small.parameters()) == sn.space.num_params(sub)
        kept = sn.space.kept_layers(sub)
        # dropped layers keep each kept layer's own attention type
        assert family_for(small.config).layer_types == [sn.family.layer_types[i] for i in kept]
        with torch.no_grad():
            assert (sn(x) - small(x).logits).abs().max().item() <= 1e-4
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again).__name__ == type(model).__name__
    with torch.no_grad():
        assert torch.allclose(again(x).logits, small(x).logits, atol=1e-6)


def test_gemma_embedding_scale_follows_the_subnetwork_width():
    """HF scales Gemma's embedding by sqrt(config.hidden_size): the extracted config's width."""
    sn = SuperNetwork(make("gemma2"), TINY_SPACE)
    sub = sn.space.smallest()
    small = extract(sn, sub)
    assert small.config.hidden_size == sub.embed_dim
    scale = small.model.embed_tokens.embed_scale.item()
    assert scale == pytest.approx(sub.embed_dim**0.5)


def test_olmo2_qk_norms_are_sliced_with_the_heads():
    sn = SuperNetwork(make("olmo2"), TINY_SPACE)
    sub = sn.space.smallest()
    small = extract(sn, sub)
    attn = small.model.layers[0].self_attn
    assert attn.q_norm.weight.shape[0] == sub.num_heads * 16
    assert attn.k_norm.weight.shape[0] == sn.space.num_kv_heads(sub) * 16


@pytest.mark.parametrize("name", ["mistral-swa", "qwen3", "olmo2", "gemma2", "gemma3"])
def test_onnx_export_keeps_the_sliding_window(name, tmp_path):
    """Prefill and decode-through-the-exported-cache on prompts longer than 2x the window."""
    sn = SuperNetwork(make(name), TINY_SPACE, layer_ranking=[2, 0, 3, 1])
    sub = sn.space.smallest()
    small = extract(sn, sn.select(sub))
    out = export_graphs(small, tmp_path / "g")
    long = check_parity(small, out, shapes=((1, 2 * WINDOW + 4), (2, 2 * WINDOW + 3)))
    assert max(long.values()) < 1e-4


def test_attention_pattern_and_elastic_dimensions_are_described():
    fam = family_for(make("gemma3").config)
    assert fam.attention_pattern() == f"2 sliding(window {WINDOW}) + 2 full: SFSF"
    assert fam.attention_pattern([0, 2, 3]) == f"2 sliding(window {WINDOW}) + 1 full: SSF"
    dims = fam.elastic_dimensions()
    assert [d.split(":")[0] for d in dims[:4]] == ["embed_dim", "num_heads", "ffn_dim", "num_layers"]
    assert family_for(make("qwen3").config).attention_pattern() == "4 full"


def test_unsupported_message_lists_the_new_families():
    from transformers import GPT2Config

    with pytest.raises(NaspruneError) as e:
        family_for(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    msg = str(e.value)
    for cls in ("Qwen3ForCausalLM", "Olmo2ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        assert cls in msg
    assert "\n" not in msg


def test_bidirectional_gemma3_is_refused_in_one_line():
    cfg = family_configs()["gemma3"]
    cfg.use_bidirectional_attention = True
    with pytest.raises(NaspruneError, match="bidirectional"):
        family_for(cfg)


def test_info_lists_pattern_elastic_dimensions_and_couplings(tmp_path):
    import json

    from typer.testing import CliRunner

    from nasprune.cli import app

    make("gemma3").save_pretrained(tmp_path / "g3")
    r = CliRunner().invoke(app, ["info", str(tmp_path / "g3"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["family"] == "gemma3"
    assert data["attention"]["pattern"] == f"2 sliding(window {WINDOW}) + 2 full: SFSF"
    assert data["attention"]["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert any("sqrt(embed_dim)" in line for line in data["elastic_dimensions"])


# ---- GGUF input ---------------------------------------------------------------------------------
def _write_gguf(model, path, arch: str) -> None:
    """A float32 GGUF of ``model`` as llama.cpp lays it out (tensor names from gguf-py's map, Gemma norms
    stored as 1 + w), with the committed tiny byte-level BPE tokenizer."""
    import json

    import gguf

    from tests.conftest import TINY_TOKENIZER

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    tok = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tok["added_tokens"] if t.get("special")}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1.0
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_source(arch: str):
    from tests.conftest import TINY_VOCAB

    base = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "qwen3":  # transformers' qwen3 GGUF reader ignores key_length: head_dim stays the default 128
        cfg = Qwen3Config(num_hidden_layers=2, head_dim=128, tie_word_embeddings=True, **base)
    else:  # gemma3: the reader keeps the defaults for the sliding pattern (5:1) and query_pre_attn_scalar
        cfg = Gemma3TextConfig(num_hidden_layers=6, head_dim=16, sliding_window=WINDOW, **base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_gguf_input_loads_as_the_family(arch, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from compressor.elastic.modeldir import load_model

    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path / "cache"))
    source = _gguf_source(arch)
    _write_gguf(source, tmp_path / f"tiny-{arch}.gguf", arch)
    loaded = load_model(str(tmp_path / f"tiny-{arch}.gguf"))
    sn = loaded.supernet()
    assert sn.family.name == arch
    x = torch.randint(3, 1024, (1, 3 * WINDOW))
    with torch.no_grad():
        assert (sn(x) - source(x).logits).abs().max().item() <= 1e-5
    if arch == "gemma3":
        assert sn.family.attention_pattern() == f"5 sliding(window {WINDOW}) + 1 full: SSSSSF"


def test_gguf_architecture_transformers_cannot_read_is_one_line(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from compressor.elastic.modeldir import load_model

    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path / "cache"))
    w = gguf.GGUFWriter(str(tmp_path / "olmo2.gguf"), "olmo2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NaspruneError) as e:
        load_model(str(tmp_path / "olmo2.gguf"))
    msg = str(e.value)
    assert "'olmo2'" in msg and "cannot read" in msg and "qwen3" in msg and "gemma3" in msg and "\n" not in msg
