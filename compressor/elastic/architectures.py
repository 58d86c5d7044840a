"""Architecture families: how each supported Hugging Face decoder is laid out.

A family answers three questions for the rest of nasprune:

* which elastic *role* each axis of each parameter plays (residual channel, query rows, KV rows,
  FFN neuron, ...). Slicing a sub-network, permuting by importance and counting parameters are
  all driven by this one table, so they cannot disagree;
* how to run one decoder block on *views* of the shared weights (the super-network forward);
* how to write the config of a smaller model that plain ``transformers`` can load.

Supported: Llama-style (Llama 2/3, SmolLM, Mistral, Qwen2; GQA/MQA), Qwen3, OLMo 2, Gemma 2,
Gemma 3 (text), Phi (phi-1/2), Phi-3 and GPT-NeoX (Pythia). Dropout is not applied in the
super-network forward (LLM fine-tuning runs without it). Sliding-window attention is real: each
layer attends within its own window (``layer_types`` / ``sliding_window`` of the config, as HF
dispatches it), so sequences longer than the window are exact too; dropping layers keeps every
kept layer's own attention type (the extracted config's ``layer_types`` are sliced with the layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from compressor.core.errors import NaspruneError
from compressor.elastic import quant_sim

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


def elastic_linear(module: torch.nn.Module, x: torch.Tensor, rows: slice, cols: int) -> torch.Tensor:
    """``module(x)`` on the weight view ``W[rows, :cols]`` (no copy).

    A peft LoRA layer is sliced the same way: ``A[:, :cols]`` reads the kept inputs and
    ``B[rows]`` writes the kept outputs, so a sub-network's adapter is the slice of the
    super-network's adapter (peft's own forward cannot take sliced inputs).
    """
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    bias = base.bias[rows] if base.bias is not None else None
    out = quant_sim.linear(base, x, base.weight[rows, :cols], bias)  # F.linear unless a quantization is simulated
    if (
        hasattr(module, "lora_A")
        and not getattr(module, "merged", False)
        and not getattr(module, "disable_adapters", False)
    ):
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a = module.lora_A[name].weight[:, :cols]
            b = module.lora_B[name].weight[rows]
            out = out + F.linear(F.linear(module.lora_dropout[name](x), a), b) * module.scaling[name]
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding on the first ``cos.shape[-1]`` dims of each head (partial rotary for Phi/NeoX)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]

    def rope(t):
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        t_rot = t_rot * cos + rotate_half(t_rot) * sin
        return torch.cat([t_rot, t_pass], dim=-1) if t_pass.shape[-1] else t_rot

    return rope(q), rope(k)


def attention(q, k, v, attention_mask, scale, window: int | None = None, softcap: float | None = None):
    """Causal attention with GQA. q: [B,H,T,D], k/v: [B,G,T,D]; attention_mask: optional [B,T] padding mask.

    ``window``: sliding-window attention as Hugging Face defines it, a query at position i sees keys
    j with i - window < j <= i. ``softcap``: Gemma 2's tanh soft-capping of the attention logits
    (``cap * tanh(logits / cap)`` before the mask), which SDPA cannot express, so that path runs eagerly.
    """
    t = q.shape[-2]
    mask = None
    if attention_mask is not None or window is not None or softcap is not None:
        pos = torch.arange(t, device=q.device)
        mask = pos[None, :] <= pos[:, None]
        if window is not None:
            mask = mask & (pos[None, :] > pos[:, None] - window)
        mask = mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # a padded query row may see nothing; let it see itself so no NaN reaches the gradients
            mask = mask | torch.eye(t, dtype=torch.bool, device=q.device)[None, None]
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class Family:
    """Base class: the layout of one architecture family. Subclasses fill in names and block math."""

    name: str = ""
    hf_classes: tuple[str, ...] = ()
    #: True when the HF config cannot express head size independently of hidden size / heads.
    couples_embed_to_heads: bool = False
    #: regex on a parameter name (layer index stripped to ``{i}``) -> axis roles
    roles: dict[str, tuple[str | None, ...]] = {}
    layers_path: str = ""
    #: RMSNorm multiplies by ``offset + weight`` (Gemma stores ``weight`` around 0, so offset 1).
    norm_offset: float = 0.0

    def __init__(self, config):
        self.config = config
        self.dims = self.read_dims(config)
        self._compiled = [(re.compile(p + "$"), r) for p, r in self.roles.items()]
        self.layer_types = self.read_layer_types(config)

    # ---- attention pattern ------------------------------------------------------------------
    def read_layer_types(self, config) -> list[str]:
        """Per layer ``full_attention`` or ``sliding_attention``, as the HF model dispatches its masks.

        Configs with ``layer_types`` (Qwen2/3, Gemma 2/3) say it per layer; Mistral and Phi-3 apply
        ``sliding_window`` to every layer when it is set.
        """
        n = config.num_hidden_layers
        types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if not types:
            types = ["sliding_attention" if window else "full_attention"] * n
        types = list(types)
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if len(types) != n or unknown:
            raise NaspruneError(
                f"{self.name}: unsupported attention layer types {unknown or types} "
                "(nasprune handles full_attention and sliding_attention)"
            )
        if "sliding_attention" in types and not window:
            raise NaspruneError(f"{self.name}: config has sliding_attention layers but no sliding_window")
        return types

    def window(self, layer_index: int | None) -> int | None:
        """Sliding-window size of a layer (by its index in the full model), None for full attention."""
        if "sliding_attention" not in self.layer_types:
            return None
        if layer_index is None:
            raise NaspruneError(f"{self.name}: cannot tell which layer a block is, so not its attention window")
        return self.config.sliding_window if self.layer_types[layer_index] == "sliding_attention" else None

    def attention_pattern(self, layers: list[int] | None = None) -> str:
        """Human-readable attention pattern of the given (kept) layers, e.g. ``5 sliding(512) + 1 full: SSSSSF``."""
        types = [self.layer_types[i] for i in (range(len(self.layer_types)) if layers is None else layers)]
        n_sliding = types.count("sliding_attention")
        if not n_sliding:
            return f"{len(types)} full"
        code = "".join("S" if t == "sliding_attention" else "F" for t in types)
        return f"{n_sliding} sliding(window {self.config.sliding_window}) + {len(types) - n_sliding} full: {code}"

    def elastic_dimensions(self) -> list[str]:
        """What a sub-network may shrink, and the couplings between dimensions (for ``nasprune info``)."""
        d = self.dims
        out = [
            f"embed_dim: residual width, sliced in the embedding, every norm and projection (full {d.hidden_size})",
            f"num_heads: query heads in whole KV groups of {d.q_per_group} (num_kv_heads = num_heads / "
            f"{d.q_per_group}); head_dim {d.head_dim} is fixed",
            f"ffn_dim: FFN neurons, one value for all layers (full {d.intermediate_size})",
            "num_layers: top-ranked layers kept in order, each with its own attention type",
        ]
        out += self.couplings()
        return out

    def couplings(self) -> list[str]:
        if self.couples_embed_to_heads:
            return [f"coupled: embed_dim = num_heads x {self.dims.head_dim} (the config fixes head size)"]
        return []

    @staticmethod
    def layer_index_of(layer) -> int | None:
        """A block's index in the full model (HF attention modules know it; dropping layers does not renumber)."""
        idx = getattr(layer, "layer_idx", None)
        if idx is None:
            attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
            idx = getattr(attn, "layer_idx", None)
        return idx

    # ---- layout -----------------------------------------------------------------------------
    def read_dims(self, config) -> ModelDims:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return ModelDims(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def param_roles(self, name: str) -> tuple[str | None, ...]:
        generic = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", name)
        for pattern, roles in self._compiled:
            if pattern.match(generic):
                return roles
        raise NaspruneError(
            f"parameter '{name}' of {self.name} has no slicing rule; this checkpoint variant is not supported"
        )

    @staticmethod
    def layer_of(name: str) -> int | None:
        m = re.search(r"\.layers\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def layers(self, model) -> torch.nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def sub_config(self, config, embed: int, heads: int, ffn: int, kept_layers: list[int]):
        """Config of the standalone smaller model; per-layer lists are sliced to the kept layers."""
        d = config.to_dict()
        n_full = config.num_hidden_layers
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == n_full and key not in ("architectures",):
                d[key] = [value[i] for i in kept_layers]
        d.update(self._sub_dims(embed, heads, ffn))
        d["num_hidden_layers"] = len(kept_layers)
        d.pop("quantization_config", None)
        return type(config).from_dict(d)

    def _sub_dims(self, embed: int, heads: int, ffn: int) -> dict:
        return {
            "hidden_size": embed,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // self.dims.q_per_group,
            "intermediate_size": ffn,
            "head_dim": self.dims.head_dim,
        }

    # ---- forward ----------------------------------------------------------------------------
    def embed(self, model, input_ids, s: ActiveShape):
        raise NotImplementedError

    def rotary(self, model):
        raise NotImplementedError

    def block(self, layer, x, cos_sin, attention_mask, s: ActiveShape):
        raise NotImplementedError

    def head(self, model, x, s: ActiveShape):
        raise NotImplementedError

    # shared pieces
    def _norm(self, module, x, n: int):
        if isinstance(module, torch.nn.LayerNorm):
            bias = module.bias[:n] if module.bias is not None else None
            return F.layer_norm(x, (n,), module.weight[:n], bias, module.eps)
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
        if self.norm_offset:  # Gemma: (x * (1 + w)) in fp32, then cast
            w = module.weight[:n].float() + self.norm_offset
            return (F.rms_norm(x.float(), (n,), None, eps) * w).to(x.dtype)
        return F.rms_norm(x.float(), (n,), None, eps).to(x.dtype) * module.weight[:n]

    def _attend(
        self,
        q,
        k,
        v,
        cos_sin,
        attention_mask,
        s: ActiveShape,
        out_module,
        embed: int,
        window: int | None = None,
        softcap: float | None = None,
        scale: float | None = None,
        head_norms=None,
    ):
        """``head_norms``: (q_norm, k_norm) applied per head over head_dim (Qwen3, Gemma 3), before rotary."""
        b, t = q.shape[:2]
        hd = self.dims.head_dim
        q = q.view(b, t, s.heads, hd)
        k = k.view(b, t, s.kv_heads, hd)
        if head_norms is not None:
            q, k = self._norm(head_norms[0], q, hd), self._norm(head_norms[1], k, hd)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, s.kv_heads, hd).transpose(1, 2)
        q, k = apply_rotary(q, k, *cos_sin)
        y = attention(q, k, v, attention_mask, hd**-0.5 if scale is None else scale, window, softcap)
        y = y.transpose(1, 2).reshape(b, t, s.heads * hd)
        return elastic_linear(out_module, y, slice(0, embed), s.heads * hd)


class LlamaFamily(Family):
    name = "llama"
    hf_classes = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    layers_path = "model.layers"
    roles = {
        r"model\.embed_tokens\.weight": (None, EMBED),
        r"model\.layers\.\{i\}\.self_attn\.q_proj\.weight": (Q, EMBED),
        r"model\.layers\.\{i\}\.self_attn\.q_proj\.bias": (Q,),
        r"model\.layers\.\{i\}\.self_attn\.[kv]_proj\.weight": (KV, EMBED),
        r"model\.layers\.\{i\}\.self_attn\.[kv]_proj\.bias": (KV,),
        r"model\.layers\.\{i\}\.self_attn\.o_proj\.weight": (EMBED, Q),
        r"model\.layers\.\{i\}\.self_attn\.o_proj\.bias": (EMBED,),
        r"model\.layers\.\{i\}\.mlp\.(gate|up)_proj\.weight": (FFN, EMBED),
        r"model\.layers\.\{i\}\.mlp\.(gate|up)_proj\.bias": (FFN,),
        r"model\.layers\.\{i\}\.mlp\.down_proj\.weight": (EMBED, FFN),
        r"model\.layers\.\{i\}\.mlp\.down_proj\.bias": (EMBED,),
        r"model\.layers\.\{i\}\.(input|post_attention)_layernorm\.weight": (EMBED,),
        r"model\.norm\.weight": (EMBED,),
        r"lm_head\.weight": (None, EMBED),
    }

    def embed(self, model, input_ids, s):
        return F.embedding(input_ids, model.model.embed_tokens.weight[:, : s.embed])

    def rotary(self, model):
        return model.model.rotary_emb

    def _qkv(self, attn, h, s):
        hd = self.dims.head_dim
        q = elastic_linear(attn.q_proj, h, slice(0, s.heads * hd), s.embed)
        k = elastic_linear(attn.k_proj, h, slice(0, s.kv_heads * hd), s.embed)
        v = elastic_linear(attn.v_proj, h, slice(0, s.kv_heads * hd), s.embed)
        return q, k, v

    def _mlp(self, mlp, h, s):
        gate = elastic_linear(mlp.gate_proj, h, slice(0, s.ffn), s.embed)
        up = elastic_linear(mlp.up_proj, h, slice(0, s.ffn), s.embed)
        return elastic_linear(mlp.down_proj, ACT2FN[self.config.hidden_act](gate) * up, slice(0, s.embed), s.ffn)

    #: q_norm / k_norm per head over head_dim (Qwen3, Gemma 3): never sliced
    head_norms: bool = False

    def _cos_sin(self, cos_sin, layer_index: int):
        """The rotary (cos, sin) of a layer; one pair for all layers unless the family has several bases."""
        return cos_sin

    def _attention_options(self, layer_index: int) -> dict:
        """Per-layer attention settings: the sliding window (and, for Gemma, scale and soft-cap)."""
        return {"window": self.window(layer_index)}

    def _self_attention(self, layer, h, cos_sin, attention_mask, s):
        """Attention branch of a block (before any post-norm): projections, norms, rotary, window."""
        attn, i = layer.self_attn, self.layer_index_of(layer)
        return self._attend(
            *self._qkv(attn, h, s),
            self._cos_sin(cos_sin, i),
            attention_mask,
            s,
            attn.o_proj,
            s.embed,
            head_norms=(attn.q_norm, attn.k_norm) if self.head_norms else None,
            **self._attention_options(i),
        )

    def block(self, layer, x, cos_sin, attention_mask, s):
        h = self._norm(layer.input_layernorm, x, s.embed)
        x = x + self._self_attention(layer, h, cos_sin, attention_mask, s)
        h = self._norm(layer.post_attention_layernorm, x, s.embed)
        return x + self._mlp(layer.mlp, h, s)

    def head(self, model, x, s):
        x = self._norm(model.model.norm, x, s.embed)
        return elastic_linear(model.lm_head, x, slice(None), s.embed)


_LLAMA_ROLES = dict(LlamaFamily.roles)
_HEAD_NORMS = {r"model\.layers\.\{i\}\.self_attn\.[qk]_norm\.weight": (None,)}  # over head_dim: never sliced


class Qwen3Family(LlamaFamily):
    """Qwen3: Qwen2 + per-head RMSNorm of q and k over head_dim (head pruning leaves those weights whole)."""

    name = "qwen3"
    hf_classes = ("Qwen3ForCausalLM",)
    roles = {**_LLAMA_ROLES, **_HEAD_NORMS}
    head_norms = True

    def couplings(self) -> list[str]:
        return ["q_norm/k_norm act per head over head_dim: head pruning keeps their weights whole"]


class Olmo2Family(LlamaFamily):
    """OLMo 2: norms *after* attention and FFN (no pre-norms), q/k RMSNorm over the whole projection.

    The q/k norm weights span ``heads x head_dim`` rows, so they carry the Q / KV roles and are
    sliced and permuted with the heads; RMS over the kept heads' rows is what the extracted model
    (whose q_norm has ``heads x head_dim`` weights) computes.
    """

    name = "olmo2"
    hf_classes = ("Olmo2ForCausalLM",)
    roles = {
        **{k: v for k, v in _LLAMA_ROLES.items() if "layernorm" not in k},
        r"model\.layers\.\{i\}\.self_attn\.q_norm\.weight": (Q,),
        r"model\.layers\.\{i\}\.self_attn\.k_norm\.weight": (KV,),
        r"model\.layers\.\{i\}\.(post_attention|post_feedforward)_layernorm\.weight": (EMBED,),
    }

    def couplings(self) -> list[str]:
        return ["q_norm/k_norm span num_heads x head_dim: their weights are sliced and permuted with the heads"]

    def _qkv(self, attn, h, s):
        q, k, v = super()._qkv(attn, h, s)
        hd = self.dims.head_dim
        return self._norm(attn.q_norm, q, s.heads * hd), self._norm(attn.k_norm, k, s.kv_heads * hd), v

    def block(self, layer, x, cos_sin, attention_mask, s):
        x = x + self._norm(
            layer.post_attention_layernorm, self._self_attention(layer, x, cos_sin, attention_mask, s), s.embed
        )
        return x + self._norm(layer.post_feedforward_layernorm, self._mlp(layer.mlp, x, s), s.embed)


class Gemma2Family(LlamaFamily):
    """Gemma 2: scaled embedding, (1 + w) RMSNorms before and after attention and FFN, soft-capping.

    The embedding is multiplied by sqrt(hidden_size). HF computes that factor from the config, so
    an extracted model of width ``embed_dim`` scales by sqrt(embed_dim); the super-network uses the
    *active* width too, so every sub-network equals its extracted model exactly.
    Attention logits are scaled by ``query_pre_attn_scalar ** -0.5`` (not head_dim) and soft-capped
    (``attn_logit_softcapping``); the final logits by ``final_logit_softcapping``. Layers alternate
    sliding-window and global attention per ``layer_types``.
    """

    name = "gemma2"
    hf_classes = ("Gemma2ForCausalLM",)
    norm_offset = 1.0
    roles = {
        **_LLAMA_ROLES,
        r"model\.layers\.\{i\}\.(input|post_attention|pre_feedforward|post_feedforward)_layernorm\.weight": (EMBED,),
    }

    def couplings(self) -> list[str]:
        out = ["the embedding is scaled by sqrt(embed_dim) of the sub-network (HF derives it from hidden_size)"]
        if self.head_norms:
            out.append("q_norm/k_norm act per head over head_dim: head pruning keeps their weights whole")
        return out

    def embed(self, model, input_ids, s):
        w = model.model.embed_tokens.weight[:, : s.embed]
        return F.embedding(input_ids, w) * torch.tensor(s.embed**0.5, dtype=w.dtype)

    def _mlp(self, mlp, h, s):
        gate = elastic_linear(mlp.gate_proj, h, slice(0, s.ffn), s.embed)
        up = elastic_linear(mlp.up_proj, h, slice(0, s.ffn), s.embed)
        act = ACT2FN[self.config.hidden_activation]
        return elastic_linear(mlp.down_proj, act(gate) * up, slice(0, s.embed), s.ffn)

    def _attention_options(self, layer_index: int) -> dict:
        return {
            "window": self.window(layer_index),
            "softcap": getattr(self.config, "attn_logit_softcapping", None),
            "scale": self.config.query_pre_attn_scalar**-0.5,
        }

    def block(self, layer, x, cos_sin, attention_mask, s):
        a = self._self_attention(layer, self._norm(layer.input_layernorm, x, s.embed), cos_sin, attention_mask, s)
        x = x + self._norm(layer.post_attention_layernorm, a, s.embed)
        m = self._mlp(layer.mlp, self._norm(layer.pre_feedforward_layernorm, x, s.embed), s)
        return x + self._norm(layer.post_feedforward_layernorm, m, s.embed)

    def head(self, model, x, s):
        logits = super().head(model, x, s)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap is not None else logits


class Gemma3Family(Gemma2Family):
    """Gemma 3 text: Gemma 2's block plus per-head (1 + w) q/k norms over head_dim, and two rotary
    bases: ``sliding_attention`` layers use the local base, ``full_attention`` layers the global one."""

    name = "gemma3"
    hf_classes = ("Gemma3ForCausalLM",)
    roles = {**Gemma2Family.roles, **_HEAD_NORMS}
    head_norms = True

    def __init__(self, config):
        if getattr(config, "use_bidirectional_attention", False):
            raise NaspruneError("Gemma 3 with use_bidirectional_attention=True (an encoder) is not supported")
        super().__init__(config)

    def rotary(self, model):
        rope, types = model.model.rotary_emb, sorted(set(self.layer_types))
        return lambda x, positions: {t: rope(x, positions, t) for t in types}

    def _cos_sin(self, cos_sin, layer_index: int):
        return cos_sin[self.layer_types[layer_index]]


class Phi3Family(LlamaFamily):
    name = "phi3"
    hf_classes = ("Phi3ForCausalLM",)
    roles = {
        r"model\.embed_tokens\.weight": (None, EMBED),
        r"model\.layers\.\{i\}\.self_attn\.qkv_proj\.weight": (QKV, EMBED),
        r"model\.layers\.\{i\}\.self_attn\.o_proj\.weight": (EMBED, Q),
        r"model\.layers\.\{i\}\.mlp\.gate_up_proj\.weight": (GATE_UP, EMBED),
        r"model\.layers\.\{i\}\.mlp\.down_proj\.weight": (EMBED, FFN),
        r"model\.layers\.\{i\}\.(input|post_attention)_layernorm\.weight": (EMBED,),
        r"model\.norm\.weight": (EMBED,),
        r"lm_head\.weight": (None, EMBED),
    }

    def _qkv(self, attn, h, s):
        hd, d = self.dims.head_dim, self.dims
        q_full, kv_full = d.num_heads * hd, d.num_kv_heads * hd
        w = attn.qkv_proj
        q = elastic_linear(w, h, slice(0, s.heads * hd), s.embed)
        k = elastic_linear(w, h, slice(q_full, q_full + s.kv_heads * hd), s.embed)
        v = elastic_linear(w, h, slice(q_full + kv_full, q_full + kv_full + s.kv_heads * hd), s.embed)
        return q, k, v

    def _mlp(self, mlp, h, s):
        full = self.dims.intermediate_size
        gate = elastic_linear(mlp.gate_up_proj, h, slice(0, s.ffn), s.embed)
        up = elastic_linear(mlp.gate_up_proj, h, slice(full, full + s.ffn), s.embed)
        return elastic_linear(mlp.down_proj, ACT2FN[self.config.hidden_act](gate) * up, slice(0, s.embed), s.ffn)


class PhiFamily(LlamaFamily):
    """Phi-1/1.5/2: LayerNorm with bias, one shared input norm, parallel attention + MLP, biased lm_head."""

    name = "phi"
    hf_classes = ("PhiForCausalLM",)
    roles = {
        r"model\.embed_tokens\.weight": (None, EMBED),
        r"model\.layers\.\{i\}\.self_attn\.q_proj\.weight": (Q, EMBED),
        r"model\.layers\.\{i\}\.self_attn\.q_proj\.bias": (Q,),
        r"model\.layers\.\{i\}\.self_attn\.[kv]_proj\.weight": (KV, EMBED),
        r"model\.layers\.\{i\}\.self_attn\.[kv]_proj\.bias": (KV,),
        r"model\.layers\.\{i\}\.self_attn\.dense\.weight": (EMBED, Q),
        r"model\.layers\.\{i\}\.self_attn\.dense\.bias": (EMBED,),
        r"model\.layers\.\{i\}\.mlp\.fc1\.weight": (FFN, EMBED),
        r"model\.layers\.\{i\}\.mlp\.fc1\.bias": (FFN,),
        r"model\.layers\.\{i\}\.mlp\.fc2\.weight": (EMBED, FFN),
        r"model\.layers\.\{i\}\.mlp\.fc2\.bias": (EMBED,),
        r"model\.layers\.\{i\}\.input_layernorm\.(weight|bias)": (EMBED,),
        r"model\.final_layernorm\.(weight|bias)": (EMBED,),
        r"lm_head\.weight": (None, EMBED),
        r"lm_head\.bias": (None,),
    }

    def __init__(self, config):
        if getattr(config, "qk_layernorm", False):
            raise NaspruneError(
                "Phi checkpoints with qk_layernorm=True are not supported (their norm size is tied to hidden/heads)"
            )
        super().__init__(config)

    def block(self, layer, x, cos_sin, attention_mask, s):
        h = self._norm(layer.input_layernorm, x, s.embed)
        attn = layer.self_attn
        a = self._attend(*self._qkv(attn, h, s), cos_sin, attention_mask, s, attn.dense, s.embed)
        m = elastic_linear(
            layer.mlp.fc2,
            ACT2FN[self.config.hidden_act](elastic_linear(layer.mlp.fc1, h, slice(0, s.ffn), s.embed)),
            slice(0, s.embed),
            s.ffn,
        )
        return x + a + m

    def head(self, model, x, s):
        x = self._norm(model.model.final_layernorm, x, s.embed)
        return elastic_linear(model.lm_head, x, slice(None), s.embed)


class GPTNeoXFamily(Family):
    """Pythia: fused per-head [q|k|v], LayerNorm with bias, (usually) parallel residual.

    GPT-NeoX's config fixes head size = hidden_size / num_attention_heads, so a sub-network's
    embedding width is coupled to its head count (embed_dim = heads * head_size).
    """

    name = "gpt_neox"
    hf_classes = ("GPTNeoXForCausalLM",)
    couples_embed_to_heads = True
    layers_path = "gpt_neox.layers"
    roles = {
        r"gpt_neox\.embed_in\.weight": (None, EMBED),
        r"gpt_neox\.layers\.\{i\}\.(input|post_attention)_layernorm\.(weight|bias)": (EMBED,),
        r"gpt_neox\.layers\.\{i\}\.attention\.query_key_value\.weight": (NEOX_QKV, EMBED),
        r"gpt_neox\.layers\.\{i\}\.attention\.query_key_value\.bias": (NEOX_QKV,),
        r"gpt_neox\.layers\.\{i\}\.attention\.dense\.weight": (EMBED, Q),
        r"gpt_neox\.layers\.\{i\}\.attention\.dense\.bias": (EMBED,),
        r"gpt_neox\.layers\.\{i\}\.mlp\.dense_h_to_4h\.weight": (FFN, EMBED),
        r"gpt_neox\.layers\.\{i\}\.mlp\.dense_h_to_4h\.bias": (FFN,),
        r"gpt_neox\.layers\.\{i\}\.mlp\.dense_4h_to_h\.weight": (EMBED, FFN),
        r"gpt_neox\.layers\.\{i\}\.mlp\.dense_4h_to_h\.bias": (EMBED,),
        r"gpt_neox\.final_layer_norm\.(weight|bias)": (EMBED,),
        r"(lm_head|embed_out)\.weight": (None, EMBED),
    }

    def read_dims(self, config) -> ModelDims:
        dims = super().read_dims(config)
        return ModelDims(**{**dims.__dict__, "num_kv_heads": dims.num_heads})

    def _sub_dims(self, embed, heads, ffn):
        return {"hidden_size": embed, "num_attention_heads": heads, "intermediate_size": ffn}

    def embed(self, model, input_ids, s):
        return F.embedding(input_ids, model.gpt_neox.embed_in.weight[:, : s.embed])

    def rotary(self, model):
        return model.gpt_neox.rotary_emb

    def block(self, layer, x, cos_sin, attention_mask, s):
        hd = self.dims.head_dim
        b, t = x.shape[:2]
        h = self._norm(layer.input_layernorm, x, s.embed)
        qkv = elastic_linear(layer.attention.query_key_value, h, slice(0, 3 * s.heads * hd), s.embed)
        q, k, v = qkv.view(b, t, s.heads, 3 * hd).chunk(3, dim=-1)
        a = self._attend(
            q.reshape(b, t, -1),
            k.reshape(b, t, -1),
            v.reshape(b, t, -1),
            cos_sin,
            attention_mask,
            s,
            layer.attention.dense,
            s.embed,
        )

        def mlp(inp):
            up = elastic_linear(layer.mlp.dense_h_to_4h, inp, slice(0, s.ffn), s.embed)
            return elastic_linear(layer.mlp.dense_4h_to_h, ACT2FN[self.config.hidden_act](up), slice(0, s.embed), s.ffn)

        if self.config.use_parallel_residual:
            return x + a + mlp(self._norm(layer.post_attention_layernorm, x, s.embed))
        x = x + a
        return x + mlp(self._norm(layer.post_attention_layernorm, x, s.embed))

    def head(self, model, x, s):
        x = self._norm(model.gpt_neox.final_layer_norm, x, s.embed)
        out = getattr(model, "lm_head", None) or model.embed_out
        return elastic_linear(out, x, slice(None), s.embed)


FAMILIES: tuple[type[Family], ...] = (
    LlamaFamily,
    Qwen3Family,
    Olmo2Family,
    Gemma2Family,
    Gemma3Family,
    PhiFamily,
    Phi3Family,
    GPTNeoXFamily,
)
SUPPORTED = tuple(c for f in FAMILIES for c in f.hf_classes)


def family_for(config) -> Family:
    """The family of a config, or a one-line error listing what is supported."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    by_type = {
        "llama": LlamaFamily,
        "mistral": LlamaFamily,
        "qwen2": LlamaFamily,
        "qwen3": Qwen3Family,
        "olmo2": Olmo2Family,
        "gemma2": Gemma2Family,
        "gemma3_text": Gemma3Family,
        "phi": PhiFamily,
        "phi3": Phi3Family,
        "gpt_neox": GPTNeoXFamily,
    }
    for family in FAMILIES:
        if any(a in family.hf_classes for a in archs):
            return family(config)
    if not archs and model_type in by_type:
        return by_type[model_type](config)
    found = ", ".join(archs) or model_type or "unknown"
    raise NaspruneError(f"unsupported architecture {found}; nasprune supports {', '.join(SUPPORTED)}")
