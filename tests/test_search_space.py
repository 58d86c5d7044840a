import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from compressor.core.errors import NaspruneError
from compressor.core.workload import Workload
from compressor.elastic.architectures import family_for
from compressor.elastic.search_space import SearchSpace, SubNetwork


def smollm2_space() -> SearchSpace:
    """SmolLM2-135M's space from its config alone (meta device: no weights needed)."""
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        num_hidden_layers=30,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return SearchSpace.from_model(family_for(config), model)


def test_smollm2_choices_respect_gqa_and_transformers_divisibility():
    space = smollm2_space()
    assert space.choices["num_heads"] == (3, 6, 9)
    assert space.choices["embed_dim"] == (288, 360, 432, 504, 576)
    assert all(f % 64 == 0 for f in space.choices["ffn_dim"]) and space.choices["ffn_dim"][-1] == 1536
    assert space.choices["num_layers"] == tuple(range(15, 31))
    for e in space.choices["embed_dim"]:
        for h in space.choices["num_heads"]:
            assert e % h == 0
    assert space.num_kv_heads(SubNetwork(576, 6, 1536, 30)) == 2
    assert space.num_params(space.largest()) == 134_515_008  # SmolLM2-135M, tied embeddings once


def test_every_offered_config_is_accepted_by_transformers():
    space = smollm2_space()
    fam = space.family
    for e in space.choices["embed_dim"]:
        for h in space.choices["num_heads"]:
            cfg = fam.sub_config(fam.config, e, h, 512, list(range(15)))
            assert cfg.hidden_size == e and cfg.num_key_value_heads == h // 3 and cfg.head_dim == 64


def test_invalid_configs_give_one_line_errors():
    space = smollm2_space()
    for bad in [
        SubNetwork(500, 9, 1536, 30),
        SubNetwork(576, 4, 1536, 30),
        SubNetwork(576, 9, 1000, 30),
        SubNetwork(576, 9, 1536, 31),
    ]:
        with pytest.raises(NaspruneError) as e:
            space.validate(bad)
        assert "\n" not in str(e.value) and "not one of" in str(e.value)
    with pytest.raises(NaspruneError, match="missing"):
        SubNetwork.parse('{"embed_dim": 576}')
    with pytest.raises(NaspruneError, match="not valid JSON"):
        SubNetwork.parse("{oops")


def test_encoding_json_and_enumeration_round_trip(tmp_path):
    space = smollm2_space()
    subs = list(space.enumerate())
    assert len(subs) == space.size == 5 * 3 * 19 * 16
    assert len(set(subs)) == len(subs)
    for sub in subs[::97]:
        assert space.decode(space.encode(sub)) == sub
        assert SubNetwork.parse(json.dumps(sub.to_dict())) == sub
    f = tmp_path / "arch.json"
    f.write_text(json.dumps({"arch": subs[5].to_dict(), "params": 1}))
    assert SubNetwork.parse(str(f)) == subs[5]
    rng = np.random.default_rng(0)
    assert all(space.validate(space.sample(rng)) for _ in range(50))


def test_smallest_largest_and_costs_are_monotone():
    space = smollm2_space()
    small, large = space.smallest(), space.largest()
    assert small == SubNetwork(288, 3, 384, 15)
    w = Workload.parse("prefill:1x128")
    assert space.num_params(small) < space.num_params(large)
    assert space.flops(small, w) < space.flops(large, w)
    assert space.flops(large, Workload.parse("prefill:1x256")) > 2 * space.flops(large, w) - 1
    assert space.flops(large, Workload.parse("decode:1x512")) > space.flops(large, Workload.parse("decode:1x64"))
    assert space.weight_bytes(large, "fp16") * 2 == space.weight_bytes(large)
    # KV cache: 2 (k,v) x layers x kv heads x head_dim x tokens x bytes
    assert space.kv_cache_bytes(large, Workload.parse("decode:1x511")) == 2 * 30 * 3 * 64 * 512 * 4


def test_workload_parsing():
    assert Workload.parse("generate:2x64+16") == Workload("generate", 2, 64, 16)
    assert str(Workload.parse("decode:1x512")) == "decode:1x512"
    for bad in ["prefill", "prefill:1x", "decode:0x5", "generate:1x5", "foo:1x2"]:
        with pytest.raises(NaspruneError, match="bad workload"):
            Workload.parse(bad)
