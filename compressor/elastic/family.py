"""The :class:`Family` base class: what an architecture family must answer for the rest of nasprune.

A family answers three questions:

* which elastic *role* each axis of each parameter plays (the ``roles`` table, read with
  :mod:`compressor.elastic.layout`);
* how to run one decoder block on *views* of the shared weights (the super-network forward, built
  from :mod:`compressor.elastic.ops`);
* how to write the config of a smaller model that plain ``transformers`` can load.

The base class holds what every family shares (attention pattern, dimensions, config slicing,
norms and the attention branch); the concrete families and their registry live in
:mod:`compressor.elastic.architectures`, one place to read when adding an architecture.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from compressor.core.errors import NaspruneError
from compressor.elastic.layout import ActiveShape, ModelDims
from compressor.elastic.ops import apply_rotary, attention, elastic_linear


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
