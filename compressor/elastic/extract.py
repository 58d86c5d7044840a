"""Extraction: a ``SubNetwork`` of a super-network -> a standalone, smaller Hugging Face model.

The result loads with plain ``transformers.AutoModelForCausalLM`` (no nasprune import): the
config states ``head_dim`` and per-layer lists are sliced to the kept layers. Weights are copied
with the same role table that the super-network slices with, so logits match and the parameter
count equals ``SearchSpace.num_params`` exactly.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoModelForCausalLM

from compressor.core.errors import NaspruneError
from compressor.elastic.layout import Selection, role_indices
from compressor.elastic.search_space import SubNetwork
from compressor.elastic.supernet import SuperNetwork


def select_tensor(tensor: torch.Tensor, roles, sel: Selection, dims) -> torch.Tensor:
    """Apply a Selection to every role-carrying axis of a tensor (slicing or permuting)."""
    for axis, role in enumerate(roles):
        if role is not None:
            tensor = tensor.index_select(axis, role_indices(role, sel, dims).to(tensor.device))
    return tensor


def extract_state_dict(supernet: SuperNetwork, sub: SubNetwork) -> dict[str, torch.Tensor]:
    space, fam = supernet.space, supernet.family
    space.validate(sub)
    sel = Selection.first_k(fam.dims, sub.embed_dim, space.num_kv_heads(sub), sub.ffn_dim)
    kept = space.kept_layers(sub)
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for info, (name, param) in zip(space.params, supernet.model.named_parameters()):
        if info.layer is not None:
            if info.layer not in new_index:
                continue
            name = re.sub(r"\.layers\.\d+\.", f".layers.{new_index[info.layer]}.", name, count=1)
        out[name] = select_tensor(param.detach(), info.roles, sel, fam.dims).clone()
    return out


def extract(supernet: SuperNetwork, sub: SubNetwork, dtype: torch.dtype | None = None):
    """Build the smaller model in memory (eval mode)."""
    space, fam = supernet.space, supernet.family
    space.validate(sub)
    config = fam.sub_config(supernet.config, sub.embed_dim, sub.num_heads, sub.ffn_dim, space.kept_layers(sub))
    state = extract_state_dict(supernet, sub)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "embed_out.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise NaspruneError(
            f"extraction produced mismatched weights (missing {missing}, unexpected {unexpected}); "
            "please report this model"
        )
    if tied:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_extracted(
    loaded,
    supernet: SuperNetwork,
    sub: SubNetwork,
    out,
    overwrite: bool = False,
    model=None,
    repair: dict | None = None,
) -> tuple:
    """Extract and write a nasprune model dir; returns (path, exact parameter count).

    ``model``: an already extracted (e.g. repaired) model of ``sub`` to write instead; ``repair``: its
    repair report, stored in ``nasprune.json`` (``subnetwork.repair``)."""
    from compressor.elastic.modeldir import ModelMeta, save_model_dir, versions

    model = extract(supernet, sub) if model is None else model
    n = sum(p.numel() for p in model.parameters())
    parent = loaded.meta.provenance
    meta = ModelMeta(
        subnetwork={
            "arch": sub.to_dict(),
            "num_kv_heads": supernet.space.num_kv_heads(sub),
            "num_params": n,
            "kept_layers": supernet.space.kept_layers(sub),
            "parent": loaded.source,
            "parent_provenance": parent,
            **({"repair": repair} if repair else {}),
        },
        provenance={
            "source": parent.get("source", loaded.source),
            "source_sha256": parent.get("source_sha256"),
            "extracted_from": str(loaded.path or loaded.source),
            "versions": versions(),
        },
    )
    if getattr(loaded.model, "generation_config", None) is not None:
        model.generation_config = loaded.model.generation_config
    return save_model_dir(model, loaded.tokenizer, meta, out, overwrite=overwrite), n
