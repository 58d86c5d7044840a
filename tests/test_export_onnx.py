"""ONNX export recipe: prefill and decode graphs match torch on shapes that were not traced."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor.quant.onnx_export import (
    ExportParityError,
    ExportRecipe,
    check_parity,
    export_graphs,
    past_names,
    present_names,
)
from tests.conftest import make_tiny


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", ["llama-gqa", "llama-mqa", "qwen2", "phi", "phi3", "gpt-neox"])
def test_prefill_and_decode_parity(family, tmp_path):
    model = make_tiny(family)
    out = export_graphs(model, tmp_path / "g")
    assert set(out.paths) == {"prefill", "decode"}
    assert all(v <= 1e-4 for v in out.parity.values()), out.parity
    assert out.graph_bytes["prefill"] > 0 and out.export_seconds["decode"] > 0
    assert out.recipe["exporter"] == "torchscript" and len(out.recipe_id) == 16


def test_decode_through_kv_cache_equals_full_recomputation(tmp_path):
    """Three decode steps through the exported cache, batch 1 (traced with 2), vs torch on the whole text."""
    model = make_tiny("llama-gqa")
    out = export_graphs(model, tmp_path / "g", check=False)
    pre, dec = _session(out.paths["prefill"]), _session(out.paths["decode"])
    n = model.config.num_hidden_layers
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    res = pre.run(None, {"input_ids": ids[:, :6].numpy(), "attention_mask": np.ones((1, 6), np.int64)})
    for t in range(6, 9):
        res = dec.run(
            None,
            {
                "input_ids": ids[:, t : t + 1].numpy(),
                "attention_mask": np.ones((1, t + 1), np.int64),
                **dict(zip(past_names(n), res[1:])),
            },
        )
        with torch.no_grad():
            full = model(input_ids=ids[:, : t + 1]).logits[:, -1].numpy()
        assert np.abs(res[0] - full).max() < 1e-4
        assert res[1].shape[2] == t + 1  # the cache grew by one position
    assert [o.name for o in dec.get_outputs()][1:] == present_names(n)


def test_prefill_returns_only_last_position_logits(tmp_path):
    model = make_tiny("qwen2")
    out = export_graphs(model, tmp_path / "g", graphs=("prefill",))
    logits = _session(out.paths["prefill"]).get_outputs()[0]
    assert len(logits.shape) == 2 and logits.shape[1] == model.config.vocab_size
    assert "decode" not in out.paths


def test_parity_failure_is_loud(tmp_path, monkeypatch):
    model = make_tiny("llama-gqa")
    out = export_graphs(model, tmp_path / "g", check=False)
    with torch.no_grad():  # the graph now computes something else than the model
        model.model.norm.weight.mul_(2.0)
    with pytest.raises(ExportParityError, match="max abs diff"):
        check_parity(model, out)


def test_failed_export_leaves_no_graphs(tmp_path):
    model = make_tiny("llama-gqa")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ExportParityError):
        export_graphs(model, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_bad_recipe_is_one_line_error():
    from compressor.core.errors import NaspruneError

    with pytest.raises(NaspruneError, match="unknown exporter"):
        ExportRecipe(exporter="magic")
    with pytest.raises(NaspruneError, match="precision"):
        ExportRecipe(precision="int3")


@pytest.mark.slow
def test_dynamo_exporter_parity(tmp_path):
    """The fallback exporter (prefill only: the dynamo export of a tiny model alone takes ~10-30 s)."""
    out = export_graphs(make_tiny("llama-gqa"), tmp_path / "g", ExportRecipe(exporter="dynamo"), graphs=("prefill",))
    assert out.recipe["opset"] == 18 and out.parity["prefill_logits"] <= 1e-4
