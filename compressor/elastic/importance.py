"""Minitron-style activation importance and the permutation that makes "first k" = "most important k".

Scores, on calibration data, aggregated over every (unpadded) token:

* **query head**: mean L2 norm of the head's attention output (the input of the output
  projection); a **KV group** scores the sum of its query heads, because sub-networks keep
  whole groups;
* **FFN neuron**: mean |activation| entering the down projection;
* **embedding channel**: mean |output| of every norm layer that reads the residual stream
  (all blocks + the final norm), summed;
* **layer**: ``drop-loss`` (default): increase of the calibration loss when the block alone is
  skipped. The FACTS measurements here showed dropping the least important layers by this
  measure beat cutting width at equal size; ``block-influence`` (ShortGPT's 1 - cos(in, out)) is
  one pass and cheaper on big models.

Layers are never reordered (their order is the computation); their ranking becomes the model's
``layer_ranking``. Everything else is permuted in place: KV groups (with their query heads),
query heads inside each group, FFN neurons per layer and embedding channels in every matrix,
norm and tied embedding that touches the residual stream. The permuted model computes the same
function (tested to 1e-4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import Progress

from compressor.core.data import IGNORE, TokenizedData
from compressor.core.errors import NaspruneError
from compressor.elastic.extract import select_tensor
from compressor.elastic.layout import EMBED, FFN, Q, Selection
from compressor.elastic.supernet import SuperNetwork

LAYER_METRICS = ("drop-loss", "block-influence")


@dataclass
class ImportanceScores:
    embed: torch.Tensor  # [E]
    heads: list[torch.Tensor]  # per layer [H]
    ffn: list[torch.Tensor]  # per layer [F]
    layers: torch.Tensor  # [L], higher = more important
    info: dict = field(default_factory=dict)

    def groups(self, q_per_group: int) -> list[torch.Tensor]:
        return [h.view(-1, q_per_group).sum(1) for h in self.heads]


def _module_names(sn: SuperNetwork) -> tuple[dict[int, str], dict[int, str], list[str]]:
    """Per layer: attention-output and FFN-output module names; all residual-stream norms."""
    attn_out, ffn_out, norms = {}, {}, []
    modules = dict(sn.model.named_modules())
    for info in sn.space.params:
        module = info.name.rsplit(".", 1)[0]
        if info.roles == (EMBED, Q):
            attn_out[info.layer] = module
        elif info.roles == (EMBED, FFN):
            ffn_out[info.layer] = module
        elif info.roles == (EMBED,) and "norm" in type(modules[module]).__name__.lower() and module not in norms:
            norms.append(module)
    return attn_out, ffn_out, norms


def _batches(data: TokenizedData, batch_size: int):
    for i in range(0, len(data), batch_size):
        yield data.subset(slice(i, i + batch_size))


@torch.no_grad()
def activation_importance(
    sn: SuperNetwork, data: TokenizedData, batch_size: int = 8, progress: Progress | None = None
) -> tuple[torch.Tensor, list, list]:
    dims = sn.family.dims
    attn_out, ffn_out, norms = _module_names(sn)
    modules = dict(sn.model.named_modules())
    embed = torch.zeros(dims.hidden_size, dtype=torch.float64)
    heads = [torch.zeros(dims.num_heads, dtype=torch.float64) for _ in range(dims.num_layers)]
    ffn = [torch.zeros(dims.intermediate_size, dtype=torch.float64) for _ in range(dims.num_layers)]
    state = {"mask": None}

    def masked(t):  # [B, T, ...] -> [N, ...] rows of real tokens
        return t[state["mask"]].double()

    def on_attn(layer):
        def hook(_module, args):
            x = masked(args[0]).view(-1, dims.num_heads, dims.head_dim)
            heads[layer].add_(x.norm(dim=-1).sum(0))

        return hook

    def on_ffn(layer):
        def hook(_module, args):
            ffn[layer].add_(masked(args[0]).abs().sum(0))

        return hook

    def on_norm(_module, _args, output):
        embed.add_(masked(output).abs().sum(0))

    handles = [modules[m].register_forward_pre_hook(on_attn(i)) for i, m in attn_out.items()]
    handles += [modules[m].register_forward_pre_hook(on_ffn(i)) for i, m in ffn_out.items()]
    handles += [modules[m].register_forward_hook(on_norm) for m in norms]
    tokens = 0
    task = progress.add_task("activation importance", total=len(data)) if progress else None
    try:
        sn.model.eval()
        for batch in _batches(data, batch_size):
            state["mask"] = batch.attention_mask.bool()
            sn.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            tokens += int(state["mask"].sum())
            if progress:
                progress.advance(task, len(batch))
    finally:
        for h in handles:
            h.remove()
    return embed / tokens, [h / tokens for h in heads], [f / tokens for f in ffn]


def _loss(sn: SuperNetwork, data: TokenizedData, batch_size: int, layers=None) -> float:
    total, count = 0.0, 0
    for batch in _batches(data, batch_size):
        logits = sn(batch.input_ids, batch.attention_mask, layers=layers)[:, :-1]
        labels = batch.labels[:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


@torch.no_grad()
def layer_importance(
    sn: SuperNetwork,
    data: TokenizedData,
    metric: str = "drop-loss",
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, dict]:
    n = sn.family.dims.num_layers
    if metric not in LAYER_METRICS:
        raise NaspruneError(f"unknown layer metric '{metric}'; choose {' or '.join(LAYER_METRICS)}")
    sn.eval()
    with sn.selected(sn.space.largest()):
        if metric == "drop-loss":
            task = progress.add_task("layer drop-loss", total=n + 1) if progress else None
            base = _loss(sn, data, batch_size)
            scores = []
            for i in range(n):
                scores.append(_loss(sn, data, batch_size, layers=[j for j in range(n) if j != i]) - base)
                if progress:
                    progress.advance(task)
            return torch.tensor(scores, dtype=torch.float64), {"base_loss": base}
        sims, tokens = torch.zeros(n, dtype=torch.float64), 0
        for batch in _batches(data, batch_size):
            mask = batch.attention_mask.bool()
            for i, (x_in, x_out) in enumerate(sn.block_io(batch.input_ids, batch.attention_mask)):
                sims[i] += F.cosine_similarity(x_in[mask].double(), x_out[mask].double(), dim=-1).sum()
            tokens += int(mask.sum())
        return 1 - sims / tokens, {}


def selections(scores: ImportanceScores, dims) -> tuple[Selection, list[Selection]]:
    """Per-layer Selections that sort every dimension by descending importance."""
    embed = torch.argsort(scores.embed, descending=True, stable=True)
    per_layer = []
    for h, f in zip(scores.heads, scores.ffn):
        groups_score = h.view(-1, dims.q_per_group).sum(1)
        per_layer.append(
            Selection(
                embed=embed,
                groups=torch.argsort(groups_score, descending=True, stable=True),
                q_in_group=torch.argsort(h.view(-1, dims.q_per_group), dim=1, descending=True, stable=True),
                ffn=torch.argsort(f, descending=True, stable=True),
            )
        )
    base = Selection(
        embed=embed,
        groups=torch.arange(dims.num_kv_heads),
        q_in_group=torch.arange(dims.q_per_group).repeat(dims.num_kv_heads, 1),
        ffn=torch.arange(dims.intermediate_size),
    )
    return base, per_layer


@torch.no_grad()
def permute(sn: SuperNetwork, scores: ImportanceScores) -> ImportanceScores:
    """Reorder the weights in place; returns the scores in the new (descending) order."""
    dims = sn.family.dims
    base, per_layer = selections(scores, dims)
    for info, (_name, param) in zip(sn.space.params, sn.model.named_parameters()):
        sel = base if info.layer is None else per_layer[info.layer]
        param.data = select_tensor(param.data, info.roles, sel, dims).contiguous()
    heads = []
    for h, sel in zip(scores.heads, per_layer):
        order = (sel.groups[:, None] * dims.q_per_group + sel.q_in_group[sel.groups]).reshape(-1)
        heads.append(h[order])
    return ImportanceScores(
        scores.embed[base.embed], heads, [f[s.ffn] for f, s in zip(scores.ffn, per_layer)], scores.layers, scores.info
    )


def compute_importance(
    sn: SuperNetwork,
    data: TokenizedData,
    layer_data: TokenizedData | None = None,
    layer_metric: str = "drop-loss",
    batch_size: int = 8,
    progress: bool = True,
) -> ImportanceScores:
    """Score everything on ``data`` (layers on ``layer_data``, default the same)."""
    start = time.perf_counter()
    with Progress(disable=not progress, transient=True) as bar:
        embed, heads, ffn = activation_importance(sn, data, batch_size, bar)
        t_act = time.perf_counter() - start
        layers, extra = layer_importance(
            sn, layer_data if layer_data is not None else data, layer_metric, batch_size, bar
        )
    info = {
        "method": "minitron-activation",
        "layer_metric": layer_metric,
        "calibration": data.source,
        "calibration_tokens": int(data.attention_mask.sum()),
        "layer_tokens": int((layer_data if layer_data is not None else data).attention_mask.sum()),
        "seconds_activation": round(t_act, 2),
        "seconds_total": round(time.perf_counter() - start, 2),
        **extra,
    }
    return ImportanceScores(embed, heads, ffn, layers, info)


def layer_ranking(scores: ImportanceScores) -> list[int]:
    return [int(i) for i in torch.argsort(scores.layers, descending=True, stable=True)]
