"""The elastic layout: which role each parameter axis plays, and what a sub-network keeps of it.

Slicing a sub-network (:mod:`compressor.elastic.extract`), permuting by importance
(:mod:`compressor.elastic.importance`) and counting parameters (:mod:`compressor.elastic.search_space`)
all read these roles and :func:`role_indices`, so they cannot disagree. A family
(:mod:`compressor.elastic.architectures`) maps each of its parameters to roles; this module knows
nothing of any architecture, so every layer above it can use it without importing the families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Axis roles. ``None`` means the axis is never sliced (vocabulary, head-internal dims).
EMBED, Q, KV, FFN, NEOX_QKV, QKV, GATE_UP = "embed", "q", "kv", "ffn", "neox_qkv", "qkv", "gate_up"


@dataclass(frozen=True)
class ModelDims:
    """The full (largest) dimensions of a model."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    tied_embeddings: bool

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Selection:
    """Kept indices per base dimension, in order. First-k slices and permutations are both Selections."""

    embed: torch.Tensor  # residual channels
    groups: torch.Tensor  # KV groups (heads for MHA)
    q_in_group: torch.Tensor  # [num_groups_full, q_per_group]: order of query heads inside each group
    ffn: torch.Tensor  # FFN neurons

    @staticmethod
    def first_k(dims: ModelDims, embed: int, groups: int, ffn: int) -> Selection:
        return Selection(
            embed=torch.arange(embed),
            groups=torch.arange(groups),
            q_in_group=torch.arange(dims.q_per_group).repeat(dims.num_kv_heads, 1),
            ffn=torch.arange(ffn),
        )


def _rows(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    return (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).reshape(-1)


def role_indices(role: str, sel: Selection, dims: ModelDims) -> torch.Tensor:
    """Indices along an axis of the given role that a Selection keeps, in the Selection's order."""
    hd, qpg = dims.head_dim, dims.q_per_group
    if role == EMBED:
        return sel.embed
    if role == FFN:
        return sel.ffn
    if role == KV:
        return _rows(sel.groups, hd)
    if role == Q:
        heads = (sel.groups[:, None] * qpg + sel.q_in_group[sel.groups]).reshape(-1)
        return _rows(heads, hd)
    if role == NEOX_QKV:  # per head [q | k | v], MHA so groups are heads
        return _rows(sel.groups, 3 * hd)
    if role == QKV:  # [q | k | v] blocks
        q_full, kv_full = dims.num_heads * hd, dims.num_kv_heads * hd
        kv = role_indices(KV, sel, dims)
        return torch.cat([role_indices(Q, sel, dims), q_full + kv, q_full + kv_full + kv])
    if role == GATE_UP:
        return torch.cat([sel.ffn, dims.intermediate_size + sel.ffn])
    raise ValueError(f"unknown role {role}")


def role_size(role: str, dims: ModelDims, embed: int, heads: int, ffn: int) -> int:
    kv_heads = heads // dims.q_per_group
    return {
        EMBED: embed,
        FFN: ffn,
        KV: kv_heads * dims.head_dim,
        Q: heads * dims.head_dim,
        NEOX_QKV: 3 * heads * dims.head_dim,
        QKV: (heads + 2 * kv_heads) * dims.head_dim,
        GATE_UP: 2 * ffn,
    }[role]


@dataclass
class ActiveShape:
    """Sizes of the currently selected sub-network, as the forward needs them."""

    embed: int
    heads: int
    kv_heads: int
    ffn: int
