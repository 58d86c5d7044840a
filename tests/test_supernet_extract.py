import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from compressor.core.errors import NaspruneError
from compressor.elastic.architectures import family_for
from compressor.elastic.extract import extract
from compressor.elastic.supernet import SuperNetwork
from tests.conftest import TINY_SPACE, make_tiny


def test_largest_subnetwork_equals_original(tiny_family):
    model = make_tiny(tiny_family)
    sn = SuperNetwork(model, TINY_SPACE)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, sn(ids), atol=1e-5)


def test_random_subnetworks_extract_exactly(tiny_family, tmp_path):
    model = make_tiny(tiny_family)
    sn = SuperNetwork(model, TINY_SPACE, layer_ranking=[2, 0, 3, 1])
    ids = torch.randint(0, 96, (2, 12))
    rng = np.random.default_rng(1)
    subs = [sn.space.smallest()] + [sn.space.sample(rng) for _ in range(4)]
    for sub in subs:
        sn.select(sub)
        small = extract(sn, sub)
        assert sum(p.numel() for p in small.parameters()) == sn.space.num_params(sub)
        with torch.no_grad():
            assert (sn(ids) - small(ids).logits).abs().max().item() <= 1e-4
    # and it round-trips through a plain save/load with no nasprune involved
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, small(ids).logits, atol=1e-6)


def test_gradients_reach_shared_weights():
    model = make_tiny("llama-gqa")
    sn = SuperNetwork(model, TINY_SPACE).train()
    sub = sn.space.smallest()
    sn.select(sub)
    ids = torch.randint(0, 96, (2, 12))
    logits = sn(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).backward()
    q = model.model.layers[sn.space.kept_layers(sub)[0]].self_attn.q_proj.weight
    rows, cols = sub.num_heads * 16, sub.embed_dim
    assert q.grad[:rows, :cols].abs().sum() > 0
    assert q.grad[rows:].abs().sum() == 0 and q.grad[:, cols:].abs().sum() == 0
    dropped = set(range(4)) - set(sn.space.kept_layers(sub))
    for i in dropped:
        assert model.model.layers[i].mlp.up_proj.weight.grad is None


def test_selection_is_explicit_state_and_compiles():
    model = make_tiny("llama-gqa")
    sn = SuperNetwork(model, TINY_SPACE)
    ids = torch.randint(0, 96, (1, 8))
    sub = sn.space.smallest()
    with sn.selected(sub):
        assert sn.active == sub
        expected = sn(ids)
        compiled = torch.compile(sn, backend="eager", fullgraph=True)
        assert torch.allclose(compiled(ids), expected)
    assert sn.active == sn.space.largest()


def test_unsupported_architecture_is_one_line():
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(NaspruneError) as e:
        family_for(cfg)
    msg = str(e.value)
    assert "gpt2" in msg and "LlamaForCausalLM" in msg and "GPTNeoXForCausalLM" in msg and "\n" not in msg


def test_padding_mask_keeps_valid_positions_exact():
    model = make_tiny("llama-gqa")
    sn = SuperNetwork(model, TINY_SPACE)
    ids = torch.randint(3, 96, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        full = sn(ids[1:, :7])
        padded = sn(ids, attention_mask=mask)[1:, :7]
    assert torch.allclose(full, padded, atol=1e-5)
