"""The search space: one vocabulary (:class:`SubNetwork`) for a sub-network, used by every stage.

A sub-network keeps the first ``embed_dim`` residual channels, the first ``num_heads`` query
heads (whole KV groups: query heads per group stay fixed, so ``num_kv_heads`` is derived), the
first ``ffn_dim`` FFN neurons and the ``num_layers`` top-ranked layers (in original order).
After importance permutation "first k" means "most important k".

Why the embedding choices are multiples of lcm(head choices, 8): transformers 5 rejects a config
whose ``hidden_size`` is not divisible by ``num_attention_heads`` even when ``head_dim`` is set,
so every (embed_dim, num_heads) pair the space offers must divide evenly for the extracted model
to load as a plain checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.core.precisions import BYTES_PER_PARAM
from compressor.core.workload import Workload
from compressor.elastic.family import Family
from compressor.elastic.layout import role_size

DIMENSIONS = ("embed_dim", "num_heads", "ffn_dim", "num_layers")


@dataclass(frozen=True, order=True)
class SubNetwork:
    """A sub-network of the super-network. ``ffn_dim`` is one value for all layers today."""

    embed_dim: int
    num_heads: int
    ffn_dim: int
    num_layers: int

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> SubNetwork:
        missing = [k for k in DIMENSIONS if k not in d]
        extra = [k for k in d if k not in DIMENSIONS and k != "num_kv_heads"]
        if missing or extra:
            raise NaspruneError(
                f"bad sub-network {json.dumps(d)}: needs exactly the keys {', '.join(DIMENSIONS)}"
                + " ("
                + "; ".join(
                    f"{what} {', '.join(keys)}" for what, keys in (("missing", missing), ("unknown", extra)) if keys
                )
                + ")"
            )
        try:
            return SubNetwork(*(int(d[k]) for k in DIMENSIONS))
        except (TypeError, ValueError):
            raise NaspruneError(f"bad sub-network {json.dumps(d)}: every dimension must be an integer") from None

    @staticmethod
    def parse(text: str) -> SubNetwork:
        """A JSON object, or a path to a file holding one (``arch`` key accepted, as in pareto.json)."""
        text = str(text).strip()
        if not text.startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise NaspruneError(f"--arch '{text}' is neither a JSON object nor an existing file")
            text = path.read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise NaspruneError(
                f"--arch is not valid JSON ({e.msg} at char {e.pos}); "
                'use e.g. {"embed_dim":576,"num_heads":9,"ffn_dim":1536,"num_layers":30}'
            ) from None
        if isinstance(d, dict) and "arch" in d and isinstance(d["arch"], dict):
            d = d["arch"]
        if not isinstance(d, dict):
            raise NaspruneError("--arch must be a JSON object with embed_dim, num_heads, ffn_dim, num_layers")
        return SubNetwork.from_dict(d)

    def __str__(self) -> str:
        return f"e{self.embed_dim}-h{self.num_heads}-f{self.ffn_dim}-l{self.num_layers}"


@dataclass(frozen=True)
class SearchSpaceConfig:
    """How wide the space is. Stored in ``nasprune.json`` so every stage sees the same space."""

    min_embed_fraction: float = 0.5
    min_heads_fraction: float = 0.0
    min_ffn_fraction: float = 0.25
    min_layers_fraction: float = 0.5
    ffn_step: int = 64
    embed_step: int | None = None  # default: lcm(head choices, 8)

    @staticmethod
    def from_dict(d: dict | None) -> SearchSpaceConfig:
        d = dict(d or {})
        known = {f for f in SearchSpaceConfig.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise NaspruneError(f"unknown search-space settings {sorted(unknown)}; known: {sorted(known)}")
        return SearchSpaceConfig(**d)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    roles: tuple[str | None, ...]
    layer: int | None


@dataclass
class SearchSpace:
    """Valid choices per dimension plus exact costs of every sub-network (params, FLOPs, bytes)."""

    family: Family
    params: list[ParamInfo]
    config: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    layer_ranking: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        d = self.family.dims
        if self.layer_ranking is None:
            self.layer_ranking = list(range(d.num_layers))
        if sorted(self.layer_ranking) != list(range(d.num_layers)):
            raise NaspruneError(
                f"layer ranking must be a permutation of 0..{d.num_layers - 1}; the nasprune.json is corrupt"
            )
        self.choices = self._make_choices()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_model(
        cls, family: Family, model, config: SearchSpaceConfig | None = None, layer_ranking: list[int] | None = None
    ) -> SearchSpace:
        params = [
            ParamInfo(n, tuple(p.shape), family.param_roles(n), family.layer_of(n)) for n, p in model.named_parameters()
        ]
        return cls(family, params, config or SearchSpaceConfig(), layer_ranking)

    @classmethod
    def from_config(
        cls, config, space_config: SearchSpaceConfig | None = None, layer_ranking: list[int] | None = None
    ) -> SearchSpace:
        """The space of a model from its HF config alone (meta device: no weights are read)."""
        import torch
        from transformers import AutoModelForCausalLM

        from compressor.elastic.architectures import family_for

        family = family_for(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(family, model, space_config, layer_ranking)

    def _make_choices(self) -> dict[str, tuple[int, ...]]:
        d, c = self.family.dims, self.config
        qpg = d.q_per_group
        heads = [
            g * qpg
            for g in range(1, d.num_kv_heads + 1)
            if g == d.num_kv_heads
            or (
                g * qpg >= c.min_heads_fraction * d.num_heads
                and (self.family.couples_embed_to_heads or d.hidden_size % (g * qpg) == 0)
            )
        ]
        min_embed = c.min_embed_fraction * d.hidden_size
        if self.family.couples_embed_to_heads:
            heads = [h for h in heads if h * d.head_dim >= min_embed] or [d.num_heads]
            embeds = [h * d.head_dim for h in heads]
            self.notes.append(
                f"{self.family.name}: head size is fixed by the config (hidden/heads), "
                f"so embed_dim = num_heads x {d.head_dim} (coupled)"
            )
        else:
            heads, step = self._embed_step(heads, min_embed)
            embeds = sorted({d.hidden_size} | {e for e in range(step, d.hidden_size, step) if e >= min_embed})
        ffn_step = min(c.ffn_step, d.intermediate_size)
        ffns = sorted(
            {d.intermediate_size}
            | {
                f
                for f in range(ffn_step, d.intermediate_size, ffn_step)
                if f >= c.min_ffn_fraction * d.intermediate_size
            }
        )
        layers = list(range(max(1, math.ceil(c.min_layers_fraction * d.num_layers)), d.num_layers + 1))
        return {
            "embed_dim": tuple(embeds),
            "num_heads": tuple(sorted(heads)),
            "ffn_dim": tuple(ffns),
            "num_layers": tuple(layers),
        }

    def _embed_step(self, heads: list[int], min_embed: float) -> tuple[list[int], int]:
        """Step for embed_dim; drops head choices whose lcm would leave fewer than 3 widths."""
        d = self.family.dims
        if self.config.embed_step:
            step = self.config.embed_step
            bad = [h for h in heads if step % h]
            if bad:
                raise NaspruneError(
                    f"embed_step {step} is not divisible by head choices {bad}; use a multiple of {_lcm(heads + [8])}"
                )
            return heads, step
        heads = list(heads)
        dropped = []

        def widths(hs):
            s = _lcm(hs + [8])
            return s, [e for e in range(s, d.hidden_size + 1, s) if e >= min_embed and d.hidden_size % s == 0]

        step, ws = widths(heads)
        while len(ws) < 3 and len(heads) > 1:
            candidates = [h for h in heads if h != d.num_heads]
            if not candidates:
                break
            best = min(candidates, key=lambda h: (widths([x for x in heads if x != h])[0], h))
            heads.remove(best)
            dropped.append(best)
            step, ws = widths(heads)
        if dropped:
            self.notes.append(
                f"head choices {sorted(dropped)} dropped so embed_dim can vary "
                f"(transformers needs hidden_size % heads == 0)"
            )
        if d.hidden_size % step:
            step = _lcm(heads)  # full width only; keep it loadable
        return heads, step

    # ---- validation and basic facts -------------------------------------------------------
    def validate(self, sub: SubNetwork) -> SubNetwork:
        for dim in DIMENSIONS:
            value, allowed = getattr(sub, dim), self.choices[dim]
            if value not in allowed:
                raise NaspruneError(f"invalid sub-network {sub.to_dict()}: {dim}={value} is not one of {list(allowed)}")
        if self.family.couples_embed_to_heads and sub.embed_dim != sub.num_heads * self.family.dims.head_dim:
            raise NaspruneError(
                f"invalid sub-network {sub.to_dict()}: for {self.family.name} embed_dim must equal "
                f"num_heads x {self.family.dims.head_dim}"
            )
        return sub

    def num_kv_heads(self, sub: SubNetwork) -> int:
        return sub.num_heads // self.family.dims.q_per_group

    def kept_layers(self, sub: SubNetwork) -> list[int]:
        return sorted(self.layer_ranking[: sub.num_layers])

    def largest(self) -> SubNetwork:
        d = self.family.dims
        return SubNetwork(d.hidden_size, d.num_heads, d.intermediate_size, d.num_layers)

    def smallest(self) -> SubNetwork:
        c = self.choices
        heads = c["num_heads"][0]
        embed = heads * self.family.dims.head_dim if self.family.couples_embed_to_heads else c["embed_dim"][0]
        return SubNetwork(embed, heads, c["ffn_dim"][0], c["num_layers"][0])

    # ---- costs ----------------------------------------------------------------------------
    def _param_numel(self, p: ParamInfo, sub: SubNetwork) -> int:
        n = 1
        for axis, role in enumerate(p.roles):
            n *= role_size(role, self.family.dims, sub.embed_dim, sub.num_heads, sub.ffn_dim) if role else p.shape[axis]
        return n

    def num_params(self, sub: SubNetwork) -> int:
        """Exact parameter count of the extracted model (tied embeddings counted once)."""
        kept = set(self.kept_layers(sub))
        return sum(self._param_numel(p, sub) for p in self.params if p.layer is None or p.layer in kept)

    def _matrix_params_per_token(self, sub: SubNetwork) -> tuple[int, int]:
        """(block matmul params over kept layers, lm_head matmul params)."""
        kept = set(self.kept_layers(sub))
        block = sum(self._param_numel(p, sub) for p in self.params if p.layer in kept and len(p.shape) == 2)
        head = self.family.dims.vocab_size * sub.embed_dim
        return block, head

    def flops(self, sub: SubNetwork, workload: Workload) -> float:
        """Analytic forward FLOPs (2 per multiply-add) of the exported graph for this workload.

        Prefill graphs return last-position logits only, so lm_head runs once per sequence.
        Attention counts the causal half of QK^T and AV.
        """
        block, head = self._matrix_params_per_token(sub)
        hd = self.family.dims.head_dim
        attn_width = sub.num_heads * hd * sub.num_layers
        b = workload.batch

        def prefill(s):
            return 2 * b * s * block + 2 * b * head + 4 * b * attn_width * s * (s + 1) / 2

        def decode(ctx):
            return 2 * b * block + 2 * b * head + 4 * b * attn_width * (ctx + 1)

        if workload.kind == "prefill":
            return float(prefill(workload.seq))
        if workload.kind == "decode":
            return float(decode(workload.seq))
        return float(prefill(workload.seq) + sum(decode(workload.seq + i) for i in range(workload.new_tokens)))

    def weight_bytes(self, sub: SubNetwork, precision: str = "fp32") -> int:
        return int(self.num_params(sub) * BYTES_PER_PARAM[precision])

    def kv_cache_bytes(self, sub: SubNetwork, workload: Workload, precision: str = "fp32") -> int:
        ctx = workload.seq + (workload.new_tokens if workload.kind == "generate" else 1)
        return (
            2
            * sub.num_layers
            * self.num_kv_heads(sub)
            * self.family.dims.head_dim
            * ctx
            * workload.batch
            * BYTES_PER_PARAM[precision]
        )

    # ---- encoding, enumeration, sampling --------------------------------------------------
    @property
    def free_dimensions(self) -> tuple[str, ...]:
        return DIMENSIONS[1:] if self.family.couples_embed_to_heads else DIMENSIONS

    def encode(self, sub: SubNetwork) -> list[int]:
        """Integer genes: the index of each free dimension's value in its choice list."""
        self.validate(sub)
        return [self.choices[d].index(getattr(sub, d)) for d in self.free_dimensions]

    def decode(self, genes) -> SubNetwork:
        genes = [int(round(float(g))) for g in genes]
        if len(genes) != len(self.free_dimensions):
            raise NaspruneError(f"expected {len(self.free_dimensions)} genes, got {len(genes)}")
        values = {}
        for dim, g in zip(self.free_dimensions, genes):
            if not 0 <= g < len(self.choices[dim]):
                raise NaspruneError(f"gene {g} out of range for {dim} (0..{len(self.choices[dim]) - 1})")
            values[dim] = self.choices[dim][g]
        if self.family.couples_embed_to_heads:
            values["embed_dim"] = values["num_heads"] * self.family.dims.head_dim
        return SubNetwork(**values)

    def gene_upper_bounds(self) -> list[int]:
        return [len(self.choices[d]) - 1 for d in self.free_dimensions]

    @property
    def size(self) -> int:
        return math.prod(len(self.choices[d]) for d in self.free_dimensions)

    def enumerate(self) -> Iterator[SubNetwork]:
        for genes in itertools.product(*(range(len(self.choices[d])) for d in self.free_dimensions)):
            yield self.decode(genes)

    def sample(self, rng: np.random.Generator) -> SubNetwork:
        """Uniform over the space (independent uniform genes = uniform over the product space)."""
        return self.decode([rng.integers(0, len(self.choices[d])) for d in self.free_dimensions])

    def balanced_at(self, fraction: float, tolerance: float = 0.03) -> SubNetwork:
        """A sub-network near ``fraction`` of the largest's params, shrinking all dimensions evenly.

        Used by benchmarks and demos to pick "the ~50% model" reproducibly.
        """
        full, big = self.num_params(self.largest()), self.largest()
        target = fraction * full
        subs = list(self.enumerate())
        params = [self.num_params(s) for s in subs]
        near = [(s, p) for s, p in zip(subs, params) if abs(p - target) <= tolerance * full]
        if not near:
            return min(zip(subs, params), key=lambda sp: abs(sp[1] - target))[0]

        def evenness(sp):
            s = sp[0]
            ratios = [getattr(s, d) / getattr(big, d) for d in DIMENSIONS]
            return (max(ratios) - min(ratios), abs(sp[1] - target))

        return min(near, key=evenness)[0]

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "choices": {k: list(v) for k, v in self.choices.items()},
            "size": self.size,
            "coupled_embed_to_heads": self.family.couples_embed_to_heads,
            "notes": self.notes,
        }


def _lcm(values: list[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out
