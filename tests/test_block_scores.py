"""Per-block "replace one block" scores: exact against a plain HF model with that block's pruned part
zeroed, stored in nasprune.json, and the additive proxy built from them."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import LoadedModel, ModelMeta
from compressor.elastic.search_space import SubNetwork
from compressor.recovery.block_scores import BlockScoreConfig, compute_block_scores, estimate_loss, proxy_for
from tests.conftest import TINY_SPACE, make_tiny


def _loaded(importance=None) -> LoadedModel:
    meta = ModelMeta(search_space=asdict(TINY_SPACE), importance=importance)
    return LoadedModel(make_tiny("llama-gqa"), None, meta, None, "tiny")


def _windows(n=6, t=16, seed=0):
    return torch.randint(3, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def _hf_loss(model, windows) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def _zeroed(model, layer: int, dim: str, width: int, head_dim: int):
    """The plain model with block ``layer``'s pruned part removed: the output projection's columns
    beyond the kept heads / neurons zeroed (exactly what running the block at that width computes)."""
    m = copy.deepcopy(model)
    block = m.model.layers[layer]
    with torch.no_grad():
        if dim == "num_heads":
            block.self_attn.o_proj.weight[:, width * head_dim :] = 0
        else:
            block.mlp.down_proj.weight[:, width:] = 0
    return m


def test_scores_equal_the_loss_change_of_the_plain_model_with_that_block_pruned():
    loaded = _loaded()
    sn = loaded.supernet()
    windows = _windows()
    scores = compute_block_scores(sn, windows, BlockScoreConfig(tokens=96, seq_len=16, choices=2, batch_size=4))
    base = _hf_loss(loaded.model, windows)
    assert abs(scores["base_loss"] - base) < 1e-5
    head_dim = sn.family.dims.head_dim
    for dim in ("num_heads", "ffn_dim"):
        assert scores["widths"][dim] and all(w < sn.space.choices[dim][-1] for w in scores["widths"][dim])
        for w, per_layer in scores["delta"][dim].items():
            assert len(per_layer) == 4
            for i in (0, 3):
                want = _hf_loss(_zeroed(loaded.model, i, dim, int(w), head_dim), windows) - base
                assert abs(per_layer[i] - want) < 1e-4, (dim, w, i, per_layer[i], want)
    # the embedding width's score is the whole network's loss change at that width
    from compressor.elastic.evaluate import mean_loss

    e = scores["widths"]["embed_dim"][0]
    with sn.selected(SubNetwork(**{**sn.space.largest().to_dict(), "embed_dim": e})):
        want = mean_loss(sn, windows) - base
    assert abs(scores["delta"]["embed_dim"][str(e)] - want) < 1e-4
    assert any(abs(v) > 1e-3 for per_layer in scores["delta"]["ffn_dim"].values() for v in per_layer)


def test_proxy_adds_block_scores_and_layer_drop_deltas():
    loaded = _loaded()
    sn = loaded.supernet()
    scores = compute_block_scores(sn, _windows(), BlockScoreConfig(tokens=96, seq_len=16, choices=2, batch_size=6))
    largest = sn.space.largest()
    assert estimate_loss(scores, sn.space, largest, None)["loss"] == scores["base_loss"]
    w = scores["widths"]["ffn_dim"][0]
    sub = SubNetwork(**{**largest.to_dict(), "ffn_dim": w})
    est = estimate_loss(scores, sn.space, sub, None)
    assert est["covered"] == ["ffn_dim"] and not est["not_covered"]
    assert est["loss"] == pytest.approx(scores["base_loss"] + sum(scores["delta"]["ffn_dim"][str(w)]))
    # a width between two scored ones is interpolated linearly
    lo, hi = sorted([*scores["widths"]["ffn_dim"], largest.ffn_dim])[:2]
    mid = next(c for c in sn.space.choices["ffn_dim"] if lo < c < hi)
    d_lo = scores["delta"]["ffn_dim"][str(lo)]
    d_hi = scores["delta"]["ffn_dim"].get(str(hi), [0.0] * 4)
    want = scores["base_loss"] + sum(a + (b - a) * (mid - lo) / (hi - lo) for a, b in zip(d_lo, d_hi))
    got = estimate_loss(scores, sn.space, SubNetwork(**{**largest.to_dict(), "ffn_dim": mid}), None)["loss"]
    assert got == pytest.approx(want)
    # depth: covered only with drop-loss deltas
    shallow = SubNetwork(**{**largest.to_dict(), "num_layers": sn.space.choices["num_layers"][0]})
    assert estimate_loss(scores, sn.space, shallow, None)["not_covered"] == ["num_layers"]
    deltas = [0.1, 0.2, 0.3, 0.4]
    est = estimate_loss(scores, sn.space, shallow, deltas)
    dropped = sorted(set(range(4)) - set(sn.space.kept_layers(shallow)))
    assert est["loss"] == pytest.approx(scores["base_loss"] + sum(deltas[i] for i in dropped))


def test_proxy_refuses_scores_of_other_weights():
    loaded = _loaded()
    scores = compute_block_scores(
        loaded.supernet(), _windows(), BlockScoreConfig(tokens=96, seq_len=16, choices=1, batch_size=6)
    )
    loaded.meta.block_scores = scores
    assert proxy_for(loaded)(loaded.supernet().space.largest())["loss"] == scores["base_loss"]
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.down_proj.weight.mul_(1.01)  # "trained" since
    with pytest.raises(NaspruneError, match="other weights"):
        proxy_for(loaded)


def test_block_scores_command_writes_a_new_model_dir(tiny_model, tmp_path):
    from compressor.core.data import PACKAGE_DATA
    from nasprune.cli import app

    data = tmp_path / "val.txt"
    data.write_text((PACKAGE_DATA / "sense_and_sensibility_validation.txt").read_text()[:20_000])
    before = (tiny_model / "model.safetensors").read_bytes()
    args = ["block-scores", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "s")]
    r = CliRunner().invoke(app, args + ["--tokens", "256", "--seq-len", "32", "--choices", "2"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "s" / "nasprune.json").read_text())
    bs = meta["block_scores"]
    assert bs["tokens"] == 256 and bs["data"] == str(data) and set(bs["delta"]) == {"num_heads", "ffn_dim", "embed_dim"}
    assert (tiny_model / "model.safetensors").read_bytes() == before  # the user's model is untouched
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
