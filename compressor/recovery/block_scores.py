"""Per-block quality scores (NVIDIA Puzzle's "replace one block" score) and a search-side loss proxy.

For every block ``i`` and a handful of widths per dimension (attention heads in whole KV groups,
FFN neurons), the score is the **validation-loss change** (nats/token) when block ``i`` alone runs
at that width while every other block, and the embedding width, stay full. The embedding width is
global (one residual stream), so it gets one whole-network score per width instead.

Cost: the residual entering every block is computed once per batch (the BLD teacher states, kept
in memory here because scoring reads each exactly once per variant); a variant of block ``i`` then
runs block ``i`` at that width and the full blocks ``i+1..L`` plus the LM head. That suffix is
what makes the score end-to-end (a block-local error can be amplified or absorbed by the rest),
and it is the whole cost: ``choices x L(L+1)/2`` block passes plus ``choices x L`` head passes per
token. On a 2-core CPU that is minutes for SmolLM2-135M at 1-2k tokens (``benchmarks/block_scores.py``).

Proxy (:func:`estimate_loss`): the loss of a sub-network is estimated as the full model's loss plus
the sum of its blocks' scores (heads and FFN width interpolated linearly between scored widths,
full width = 0), the embedding width's score, and, for each dropped layer, the importance stage's
drop-loss delta where the model has one (``importance.layer_scores`` with ``layer_metric:
drop-loss``); without those, depth is **not covered** and the estimate says so. Additivity is the
assumption Puzzle's MIP makes too; ``benchmarks/block_scores.py`` measures how well it ranks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from compressor.core.errors import NaspruneError
from compressor.elastic.search_space import SubNetwork

KEY_DIMS = ("num_heads", "ffn_dim")


@dataclass
class BlockScoreConfig:
    tokens: int = 2048  # validation tokens (paired: every variant is scored on the same tokens)
    seq_len: int = 128
    choices: int = 3  # widths scored per dimension (evenly spread over the space's choices below full)
    num_heads: tuple[int, ...] | None = None  # explicit widths instead (each must be a choice of the space)
    ffn_dim: tuple[int, ...] | None = None
    embed_dim: tuple[int, ...] | None = None
    batch_size: int = 8

    def __post_init__(self):
        for name in ("tokens", "seq_len", "choices", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise NaspruneError(f"block scores {name} must be >= 1 (got {getattr(self, name)})")
        if self.tokens < self.seq_len:
            raise NaspruneError(f"block scores need tokens >= seq_len ({self.tokens} < {self.seq_len})")


def _spread(values: tuple[int, ...], k: int) -> list[int]:
    """Up to ``k`` widths spread evenly over ``values`` (sorted), always including the smallest."""
    if len(values) <= k:
        return list(values)
    idx = sorted({round(j * (len(values) - 1) / max(1, k - 1)) for j in range(k)}) if k > 1 else [0]
    return [values[j] for j in idx]


def scored_widths(space, cfg: BlockScoreConfig) -> dict[str, list[int]]:
    """The widths scored per dimension (the full width is the reference, never scored)."""
    out = {}
    for dim in (*KEY_DIMS, "embed_dim"):
        full = space.choices[dim][-1]
        below = tuple(v for v in space.choices[dim] if v < full)
        given = getattr(cfg, dim)
        if given is not None:
            bad = [v for v in given if v not in space.choices[dim]]
            if bad:
                raise NaspruneError(f"{dim} widths {bad} are not choices of the search space {space.choices[dim]}")
            out[dim] = sorted({int(v) for v in given if v < full})
        else:
            out[dim] = _spread(below, cfg.choices)
    return out


def _loss_sum(sn, x, ids, shape, start: int) -> float:
    """Summed next-token CE of running blocks ``start..L`` (at ``shape``) then the head from residual ``x``."""
    fam = sn.family
    blocks = fam.layers(sn.model)
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    cos_sin = fam.rotary(sn.model)(x, positions)
    for layer in blocks[start:]:
        x = fam.block(layer, x, cos_sin, None, shape)
    logits = fam.head(sn.model, x, shape)[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


@torch.no_grad()
def compute_block_scores(supernet, windows: torch.Tensor, cfg: BlockScoreConfig | None = None, log=None) -> dict:
    """Scores of every block at every chosen width on ``windows`` ([N, T] validation token ids).

    Returns the record stored under ``block_scores`` in ``nasprune.json``: ``delta[dim][w][i]`` is the
    loss change with block ``i`` at width ``w`` of ``dim``; ``embed_dim`` deltas are whole-network."""
    from compressor.recovery.distill import state_dict_hash

    cfg = cfg or BlockScoreConfig()
    sn = supernet.eval()
    space, fam = sn.space, sn.family
    widths = scored_widths(space, cfg)
    largest = space.largest()
    n_layers = len(fam.layers(sn.model))
    full_shape = sn._shape_of(largest)
    sums = {dim: {w: [0.0] * n_layers for w in widths[dim]} for dim in KEY_DIMS}
    embed_sums = {w: 0.0 for w in widths["embed_dim"]}
    base, count = 0.0, 0
    start = time.perf_counter()
    blocks = fam.layers(sn.model)
    for b in range(0, len(windows), cfg.batch_size):
        ids = windows[b : b + cfg.batch_size]
        with sn.selected(largest):
            x, cos_sin = sn._embed(ids)
        states = [x]  # residual entering every block, full model
        for layer in blocks:
            x = fam.block(layer, x, cos_sin, None, full_shape)
            states.append(x)
        logits = fam.head(sn.model, x, full_shape)[:, :-1].float()
        base += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
        for dim in KEY_DIMS:
            for w in widths[dim]:
                shape = sn._shape_of(SubNetwork(**{**largest.to_dict(), dim: w}))
                for i in range(n_layers):
                    y = fam.block(blocks[i], states[i], cos_sin, None, shape)
                    sums[dim][w][i] += _loss_sum(sn, y, ids, full_shape, i + 1)
        for w in widths["embed_dim"]:
            sub = SubNetwork(**{**largest.to_dict(), "embed_dim": w})
            with sn.selected(sub):
                logits = sn(ids)[:, :-1].float()
            embed_sums[w] += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            )
        if log:
            log(f"  block scores: {min(b + cfg.batch_size, len(windows))}/{len(windows)} windows")
    base_loss = base / count
    delta = {dim: {str(w): [s / count - base_loss for s in sums[dim][w]] for w in widths[dim]} for dim in KEY_DIMS}
    delta["embed_dim"] = {str(w): embed_sums[w] / count - base_loss for w in widths["embed_dim"]}
    return {
        "metric": "validation loss change (nats/token): one block at the width, every other block and the "
        "embedding full (embed_dim: the whole network at that width)",
        "tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "base_loss": base_loss,
        "widths": widths,
        "delta": delta,
        "full": {dim: space.choices[dim][-1] for dim in (*KEY_DIMS, "embed_dim")},
        "weights": state_dict_hash(sn.model),
        "config": asdict(cfg),
        "seconds": time.perf_counter() - start,
    }


# ---- the proxy ----------------------------------------------------------------------------
def _interp(points: dict[int, float], w: int) -> float:
    """Piecewise-linear in width through the scored points (the full width scores 0). Below the
    narrowest scored width the narrowest point's value is used: an underestimate there, which is why
    the default choices always include the space's narrowest width."""
    xs = sorted(points)
    if w in points:
        return points[w]
    if w >= xs[-1]:
        return points[xs[-1]]
    if w <= xs[0]:
        return points[xs[0]]  # never extrapolate an optimistic value below the narrowest scored width
    j = next(k for k in range(len(xs)) if xs[k] > w)
    lo, hi = xs[j - 1], xs[j]
    return points[lo] + (points[hi] - points[lo]) * (w - lo) / (hi - lo)


def layer_drop_deltas(meta) -> list[float] | None:
    """The importance stage's per-layer drop-loss deltas (loss increase when the layer alone is
    skipped), or None when the model has none (no importance, or the block-influence metric)."""
    imp = meta.importance or {}
    if imp.get("layer_metric") != "drop-loss" or not imp.get("layer_scores"):
        return None
    return [float(x) for x in imp["layer_scores"]]


def estimate_loss(scores: dict, space, sub: SubNetwork, layer_deltas: list[float] | None) -> dict:
    """The additive proxy for ``sub``'s validation loss: ``{"loss": ..., "covered": [...], "not_covered": [...]}``."""
    space.validate(sub)
    full, delta = scores["full"], scores["delta"]
    loss = scores["base_loss"]
    covered, missing = [], []
    kept = space.kept_layers(sub)
    for dim in KEY_DIMS:
        w = getattr(sub, dim)
        if w >= full[dim]:
            continue
        per_layer = {int(k): v for k, v in delta[dim].items()}
        if not per_layer:
            missing.append(dim)
            continue
        for i in kept:
            pts = {k: v[i] for k, v in per_layer.items()}
            pts[full[dim]] = 0.0
            loss += _interp(pts, w)
        covered.append(dim)
    if sub.embed_dim < full["embed_dim"]:
        pts = {int(k): v for k, v in delta["embed_dim"].items()}
        if pts:
            pts[full["embed_dim"]] = 0.0
            loss += _interp(pts, sub.embed_dim)
            covered.append("embed_dim")
        else:
            missing.append("embed_dim")
    dropped = sorted(set(range(space.choices["num_layers"][-1])) - set(kept))
    if dropped:
        if layer_deltas is None:
            missing.append("num_layers")
        else:
            loss += sum(layer_deltas[i] for i in dropped)
            covered.append("num_layers")
    return {"loss": loss, "covered": covered, "not_covered": missing}


def proxy_for(loaded, check_weights: bool = True):
    """``f(sub) -> estimated validation loss`` from the model's stored block scores (a cheap accuracy
    estimate for search). Refuses scores computed for other weights (e.g. before training)."""
    scores = loaded.meta.block_scores
    if not scores:
        raise NaspruneError(
            f"{loaded.path or loaded.source} has no block scores; compute them with nasprune block-scores"
        )
    sn = loaded.supernet()
    if check_weights:
        from compressor.recovery.distill import state_dict_hash

        if state_dict_hash(sn.model) != scores.get("weights"):
            raise NaspruneError(
                "the stored block scores were computed for other weights (the model was trained or "
                "permuted since); recompute them with nasprune block-scores"
            )
    deltas = layer_drop_deltas(loaded.meta)
    return lambda sub: estimate_loss(scores, sn.space, sub, deltas)
