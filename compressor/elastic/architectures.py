"""Architecture families: how each supported Hugging Face decoder is laid out, and the registry.

One :class:`~compressor.elastic.family.Family` subclass per family (its role table, block math and
config names) and :func:`family_for`, which picks the family of a config. This is the file to edit
when adding an architecture; what all families share is in :mod:`compressor.elastic.family`, the
role algebra in :mod:`compressor.elastic.layout` and the forward primitives in
:mod:`compressor.elastic.ops`, so each family here is only what makes it different.

Supported: Llama-style (Llama 2/3, SmolLM, Mistral, Qwen2; GQA/MQA), Qwen3, OLMo 2, Gemma 2,
Gemma 3 (text), Phi (phi-1/2), Phi-3 and GPT-NeoX (Pythia). Dropout is not applied in the
super-network forward (LLM fine-tuning runs without it). Sliding-window attention is real: each
layer attends within its own window (``layer_types`` / ``sliding_window`` of the config, as HF
dispatches it), so sequences longer than the window are exact too; dropping layers keeps every
kept layer's own attention type (the extracted config's ``layer_types`` are sliced with the layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from compressor.core.errors import NaspruneError
from compressor.elastic.family import Family
from compressor.elastic.layout import EMBED, FFN, GATE_UP, KV, NEOX_QKV, QKV, ModelDims, Q
from compressor.elastic.ops import elastic_linear


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
