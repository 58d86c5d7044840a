"""Features of one (sub-network, workload) pair: the single function both fit and predict call.

Why these columns: latency on a CPU/GPU engine is, to first order, a sum of compute time
(FLOPs), memory traffic (weights read once per graph run, KV cache read per decode step) and a
per-layer, per-run overhead (kernel launches, norms, element-wise ops). Giving the models those
analytic terms lets a *linear* model be accurate and lets the tree models split on quantities
that actually drive latency instead of rediscovering products of raw dimensions. The raw
dimensions stay in so the trees can still model effects the formulas miss (e.g. GEMM shapes
that fall off a kernel's fast path).

``FEATURE_SCHEMA`` is stored in every predictor's manifest; a predictor whose schema differs
from this module's is refused at load time, because its columns would mean something else.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.core.precisions import BYTES_PER_PARAM, export_dtype
from compressor.core.workload import Workload
from compressor.elastic.search_space import SearchSpace, SubNetwork

FEATURE_SCHEMA = "nasprune-latency-features/1"

RAW = ("embed_dim", "num_heads", "num_kv_heads", "ffn_dim", "num_layers")
WORKLOAD = ("batch", "seq", "new_tokens", "is_prefill", "is_decode", "is_generate", "graph_runs", "tokens")
# Additive cost terms: the linear model uses only these (plus an intercept).
ANALYTIC = (
    "flops",
    "attention_flops",
    "weight_traffic_bytes",
    "kv_cache_bytes",
    "kv_traffic_bytes",
    "activation_elements",
    "layer_runs",
    "graph_runs",
)
OTHER = ("params", "weight_bytes")
FEATURE_NAMES: tuple[str, ...] = RAW + WORKLOAD + tuple(a for a in ANALYTIC if a not in WORKLOAD) + OTHER


def bytes_per_param(precision: str) -> float:
    try:
        return BYTES_PER_PARAM[precision]
    except KeyError:
        raise NaspruneError(
            f"precision '{precision}' has no known byte width; use one of {', '.join(BYTES_PER_PARAM)}"
        ) from None


def _decode_steps(w: Workload) -> list[int]:
    """Context length seen by each decode step of the workload (empty for prefill)."""
    if w.kind == "decode":
        return [w.seq]
    if w.kind == "generate":
        return [w.seq + i for i in range(w.new_tokens)]
    return []


def features_of(space: SearchSpace, sub: SubNetwork, w: Workload, precision: str) -> dict[str, float]:
    """Every feature of one pair, by name (see module docstring for why each exists)."""
    bpp = bytes_per_param(precision)
    kv_precision = export_dtype(precision)  # quantized recipes keep activations and the KV cache in float
    kv_bpp = bytes_per_param(kv_precision)
    hd = space.family.dims.head_dim
    kv_heads = space.num_kv_heads(sub)
    params = space.num_params(sub)
    prompt = w.seq if w.kind in ("prefill", "generate") else 0
    steps = _decode_steps(w)
    graph_runs = (1 if prompt else 0) + len(steps)
    tokens = w.batch * (prompt + len(steps))
    # attention score + value FLOPs (the part of `flops` that grows with sequence length squared)
    width = sub.num_layers * sub.num_heads * hd * w.batch
    attention = 4 * width * (prompt * (prompt + 1) / 2 + sum(c + 1 for c in steps))
    # each decode step reads the whole cache so far (K and V, every kept layer)
    kv_per_token = 2 * sub.num_layers * kv_heads * hd * w.batch * kv_bpp
    kv_traffic = kv_per_token * sum(c + 1 for c in steps)
    per_token_width = 2 * sub.embed_dim + sub.ffn_dim + 2 * sub.num_heads * hd
    return {
        "embed_dim": sub.embed_dim,
        "num_heads": sub.num_heads,
        "num_kv_heads": kv_heads,
        "ffn_dim": sub.ffn_dim,
        "num_layers": sub.num_layers,
        "batch": w.batch,
        "seq": w.seq,
        "new_tokens": w.new_tokens,
        "is_prefill": float(w.kind == "prefill"),
        "is_decode": float(w.kind == "decode"),
        "is_generate": float(w.kind == "generate"),
        "graph_runs": graph_runs,
        "tokens": tokens,
        "flops": space.flops(sub, w),
        "attention_flops": attention,
        "weight_traffic_bytes": graph_runs * params * bpp,
        "kv_cache_bytes": space.kv_cache_bytes(sub, w, kv_precision),
        "kv_traffic_bytes": kv_traffic,
        "activation_elements": tokens * sub.num_layers * per_token_width,
        "layer_runs": graph_runs * sub.num_layers,
        "params": params,
        "weight_bytes": params * bpp,
    }


def feature_matrix(
    space: SearchSpace, subs: Sequence[SubNetwork], workloads: Sequence[Workload] | Workload, precision: str
) -> np.ndarray:
    """``[len(subs), len(FEATURE_NAMES)]`` float64; one workload for all rows, or one per row."""
    if isinstance(workloads, Workload):
        workloads = [workloads] * len(subs)
    if len(workloads) != len(subs):
        raise ValueError(f"{len(subs)} sub-networks but {len(workloads)} workloads")
    rows = [features_of(space, s, w, precision) for s, w in zip(subs, workloads)]
    return np.array([[r[n] for n in FEATURE_NAMES] for r in rows], dtype=np.float64).reshape(
        len(rows), len(FEATURE_NAMES)
    )


def analytic_columns() -> list[int]:
    """Column indices of :data:`ANALYTIC` in the feature matrix (what the linear model sees)."""
    return [FEATURE_NAMES.index(a) for a in ANALYTIC]
