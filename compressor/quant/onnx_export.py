"""Extracted sub-network -> ONNX: the one export recipe shared by profiling and deploy.

Two graphs per model, because a served LLM runs two different programs:

* ``prefill``: ``input_ids, attention_mask [B, S]`` -> ``logits [B, vocab]`` of the *last*
  position plus ``present.{i}.key|value [B, kv_heads, S, head_dim]``. This is time to first
  token; returning full-sequence logits would add a ``S x vocab`` matmul that serving never
  runs and overstate prefill latency.
* ``decode``: one token per sequence, ``input_ids [B, 1]``, ``attention_mask [B, P+1]`` and
  ``past_key_values.{i}.key|value [B, kv_heads, P, head_dim]`` in, last logits and
  ``present.* [B, kv_heads, P+1, head_dim]`` out.

Batch and sequence axes are dynamic. The graphs are traced with batch 2 and distinct lengths so
that no size that happens to be 0 or 1 is frozen into the graph as a constant. Every export is
checked against torch on shapes other than the traced ones (batch 1 and 3): prefill logits and
KV, and decode *through the exported KV cache* against a full recomputation of the longer
sequence. A difference above tolerance raises :class:`ExportParityError` (nothing is silently
timed that computes something else).

The legacy TorchScript exporter (``dynamo=False``) is the default: ~10 s for SmolLM2-135M
against ~90 s for the dynamo exporter, and parity is checked either way. It needs an explicit
``attention_mask`` (without one it meets ``aten::diff``, which it cannot export), so both graphs
take one. The recipe (exporter, opset, precision, graph layout, library versions) is a
dictionary recorded with every measurement; its hash is the ``recipe_id``.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressor.core.errors import NaspruneError
from compressor.core.hashing import sha256_json

RECIPE_FORMAT = "nasprune-onnx/1"
EXPORTERS = ("torchscript", "dynamo")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
GRAPH_FILE = "model.onnx"
GRAPH_KINDS = ("prefill", "decode", "logits")  # logits: full-sequence, for quality through an engine
# Allowed max abs diff = atol + rtol * max|torch value|. fp32 kernels reorder sums: SmolLM2 logits
# (|x| up to ~30) differ by ~1e-4; an export bug (wrong positions, a frozen shape) differs by O(1).
TOLERANCE = {"fp32": (1e-3, 1e-4), "fp16": (5e-2, 1e-2)}


class ExportParityError(NaspruneError):
    """The exported graph does not compute what torch computes (above tolerance)."""


@dataclass(frozen=True)
class ExportRecipe:
    """How a graph is produced. Anything that can change the graph's speed or numbers is here."""

    exporter: str = "torchscript"
    opset: int | None = None  # default: 17 for torchscript, 18 (its native opset) for dynamo
    precision: str = "fp32"
    trace_batch: int = 2
    trace_seq: int = 5
    trace_past: int = 3

    def __post_init__(self):
        if self.exporter not in EXPORTERS:
            raise NaspruneError(f"unknown exporter '{self.exporter}'; choose one of {', '.join(EXPORTERS)}")
        if self.opset is None:
            object.__setattr__(self, "opset", 17 if self.exporter == "torchscript" else 18)
        if self.precision not in PRECISIONS:
            raise NaspruneError(f"ONNX export supports precision {', '.join(PRECISIONS)}, not '{self.precision}'")
        if self.trace_batch < 2 or self.trace_seq < 2 or self.trace_past < 2 or self.trace_seq == self.trace_past:
            raise NaspruneError("trace shapes must be >= 2 and distinct so that no dynamic size is frozen")

    @staticmethod
    def from_dict(d: dict) -> ExportRecipe:
        """The recipe a recorded ``export_recipe`` describes (extra keys, e.g. builder settings, ignored)."""
        return ExportRecipe(**{k: d[k] for k in ExportRecipe.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict:
        import onnx
        import transformers

        return {
            "format": RECIPE_FORMAT,
            **asdict(self),
            "graphs": {
                "prefill": "input_ids+attention_mask -> last-position logits + present KV",
                "decode": "1 token + attention_mask + past KV -> last-position logits + present KV",
            },
            "versions": {
                "torch": torch.__version__.split("+")[0],
                "transformers": transformers.__version__,
                "onnx": onnx.__version__,
            },
        }

    @property
    def recipe_id(self) -> str:
        return recipe_id(self.to_dict())


def recipe_id(recipe: dict) -> str:
    return sha256_json(recipe, 16)


@dataclass
class ExportedGraphs:
    """Where the graphs are, what they cost to make and how close they are to torch."""

    directory: Path
    paths: dict[str, Path]
    recipe: dict
    export_seconds: dict[str, float]
    graph_bytes: dict[str, int]
    parity: dict[str, float] = field(default_factory=dict)

    @property
    def recipe_id(self) -> str:
        return recipe_id(self.recipe)


# ---- names ----------------------------------------------------------------------------------
def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


# ---- wrappers: the exact programs that are exported -------------------------------------------
def _flat_cache(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        out += [layer.keys, layer.values]
    return out


def _new_cache(config):
    """An empty KV cache for the graphs.

    Models with sliding-window layers get a plain cache that keeps every position: HF's sliding
    cache layer drops keys outside the window with Python control flow on the length, which
    tracing would freeze at the traced length (and it would change the ``present`` layout). The
    model's sliding-window *mask* still applies, so the graph stays exact for prompts longer than
    the window, at the memory of a full cache.
    """
    from transformers import DynamicCache

    if "sliding_attention" in (getattr(config, "layer_types", None) or ()) or getattr(config, "sliding_window", None):
        return DynamicCache()
    return DynamicCache(config=config)


class PrefillGraph(torch.nn.Module):
    """Prompt in, last-position logits and the KV cache out (time to first token)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            cache=_new_cache(self.model.config),
            logits_to_keep=1,
        )
        return (out.logits[:, -1, :], *_flat_cache(out.cache))


class LogitsGraph(torch.nn.Module):
    """Every position's logits, no cache: the graph that measures a model's quality through an engine
    (perplexity of what a quantized engine computes), never timed as serving latency."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class DecodeGraph(torch.nn.Module):
    """One token per sequence through the cache; positions follow from the cache length."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        cache = _new_cache(self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=True, cache=cache, logits_to_keep=1
        )
        return (out.logits[:, -1, :], *_flat_cache(out.cache))


def kv_shape(model, batch: int, length: int) -> tuple[int, int, int, int]:
    c = model.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return batch, kv_heads, length, head_dim


def num_layers(model) -> int:
    return model.config.num_hidden_layers


# ---- export ---------------------------------------------------------------------------------
def check_free_disk(directory: Path, model, graphs: int) -> None:
    """Refuse before writing when the disk cannot hold the graphs (weights + ~10% per graph)."""
    need = int(sum(p.numel() * p.element_size() for p in model.parameters()) * 1.1 * graphs) + (64 << 20)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise NaspruneError(
            f"not enough free disk in {directory} for ONNX graphs ({free >> 20} MiB free, "
            f"{need >> 20} MiB needed); free space or pass a work dir on a larger disk"
        )


def _sample_inputs(model, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    return ids, torch.ones(batch, seq, dtype=torch.int64)


def _export(module, args, path: Path, input_names, output_names, dynamic_axes, recipe: ExportRecipe) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # the dynamo exporter prints progress lines to stdout; our CLI owns stdout
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if recipe.exporter == "torchscript":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=recipe.opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        else:
            dyn = torch.export.Dim.DYNAMIC
            specs = [{axis: dyn for axis in dynamic_axes[name]} for name in input_names]
            shapes = (*specs[:2], tuple(specs[2:])) if len(specs) > 2 else tuple(specs)  # *past is one argument
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=recipe.opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=shapes,
                optimize=True,
            )
            program.save(str(path), external_data=True)


def export_prefill(model, path: Path, recipe: ExportRecipe) -> None:
    n = num_layers(model)
    ids, mask = _sample_inputs(model, recipe.trace_batch, recipe.trace_seq)
    present = present_names(n)
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "logits": {0: "batch"},
        **{name: {0: "batch", 2: "seq"} for name in present},
    }
    _export(PrefillGraph(model), (ids, mask), path, ["input_ids", "attention_mask"], ["logits", *present], axes, recipe)


def export_logits(model, path: Path, recipe: ExportRecipe) -> None:
    ids, mask = _sample_inputs(model, recipe.trace_batch, recipe.trace_seq)
    axes = {name: {0: "batch", 1: "seq"} for name in ("input_ids", "attention_mask", "logits")}
    _export(LogitsGraph(model), (ids, mask), path, ["input_ids", "attention_mask"], ["logits"], axes, recipe)


def export_decode(model, path: Path, recipe: ExportRecipe) -> None:
    n = num_layers(model)
    b, p = recipe.trace_batch, recipe.trace_past
    ids, _ = _sample_inputs(model, b, 1)
    mask = torch.ones(b, p + 1, dtype=torch.int64)
    dtype = next(model.parameters()).dtype
    past = tuple(torch.randn(kv_shape(model, b, p), dtype=dtype) * 0.5 for _ in range(2 * n))
    pasts, present = past_names(n), present_names(n)
    axes = {
        "input_ids": {0: "batch"},
        "attention_mask": {0: "batch", 1: "total"},
        "logits": {0: "batch"},
        **{name: {0: "batch", 2: "past"} for name in pasts},
        **{name: {0: "batch", 2: "total"} for name in present},
    }
    _export(
        DecodeGraph(model),
        (ids, mask, *past),
        path,
        ["input_ids", "attention_mask", *pasts],
        ["logits", *present],
        axes,
        recipe,
    )


def graph_bytes(path: Path) -> int:
    """The graph file plus any external-data files beside it."""
    return sum(f.stat().st_size for f in Path(path).parent.iterdir() if f.is_file())


def export_graphs(
    model,
    directory: Path,
    recipe: ExportRecipe | None = None,
    graphs: tuple[str, ...] = ("prefill", "decode"),
    check: bool = True,
    providers: list | None = None,
) -> ExportedGraphs:
    """Export ``graphs`` of ``model`` into ``directory/<graph>/model.onnx`` and check parity.

    The model is exported in the recipe's precision (a half copy for fp16). Parity runs on
    ``providers`` (default CPU; fp16 graphs need a GPU provider and are otherwise not checked).
    """
    recipe = recipe or ExportRecipe()
    directory = Path(directory)
    unknown = set(graphs) - set(GRAPH_KINDS)
    if unknown:
        raise NaspruneError(f"unknown graph(s) {sorted(unknown)}; choose from {', '.join(GRAPH_KINDS)}")
    check_free_disk(directory, model, len(graphs))
    model = model.eval()
    if next(model.parameters()).dtype != PRECISIONS[recipe.precision]:
        model = _copy_in(model, PRECISIONS[recipe.precision])
    paths, seconds = {}, {}
    exporters = {"prefill": export_prefill, "decode": export_decode, "logits": export_logits}
    try:
        for name in graphs:
            paths[name] = directory / name / GRAPH_FILE
            t = time.perf_counter()
            exporters[name](model, paths[name], recipe)
            seconds[name] = round(time.perf_counter() - t, 3)
        out = ExportedGraphs(directory, paths, recipe.to_dict(), seconds, {k: graph_bytes(p) for k, p in paths.items()})
        if check:
            out.parity = check_parity(model, out, recipe.precision, providers)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return out


def _copy_in(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype).eval()


# ---- parity ---------------------------------------------------------------------------------
def _session(path: Path, providers):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def check_parity(
    model,
    graphs: ExportedGraphs,
    precision: str = "fp32",
    providers: list | None = None,
    shapes: tuple[tuple[int, int], ...] = ((1, 7), (3, 4)),
) -> dict[str, float]:
    """Max abs diffs of the ONNX graphs against torch, on batch/length pairs that were not traced.

    ``prefill_logits`` / ``prefill_kv``: prefill graph vs torch on the same prompt.
    ``decode_logits``: ORT prefill of S tokens, then the decode graph on token S+1 through that
    cache, against torch's full recomputation of all S+1 tokens.
    Raises :class:`ExportParityError` when a diff exceeds atol + rtol x max|torch value|
    (``TOLERANCE`` per precision; NaN always fails).
    """
    if precision == "fp16" and not providers:
        return {}  # ORT's CPU provider lacks fp16 kernels for these graphs; checked where a GPU provider runs
    found: dict[str, list[tuple[float, float]]] = {
        "prefill_logits": [],
        "prefill_kv": [],
        "decode_logits": [],
        "all_logits": [],
    }
    pre = _session(graphs.paths["prefill"], providers) if "prefill" in graphs.paths else None
    dec = _session(graphs.paths["decode"], providers) if "decode" in graphs.paths else None
    full_graph = _session(graphs.paths["logits"], providers) if "logits" in graphs.paths else None
    n = num_layers(model)
    for batch, seq in shapes:
        ids, mask = _sample_inputs(model, batch, seq + 1, seed=batch * 100 + seq)
        with torch.no_grad():
            ref = PrefillGraph(model)(ids[:, :seq], mask[:, :seq])
            every = model(input_ids=ids, attention_mask=mask).logits.float().numpy()
            full = every[:, -1]
        ref = [t.float().numpy() for t in ref]
        if pre is not None:
            got = pre.run(None, {"input_ids": ids[:, :seq].numpy(), "attention_mask": mask[:, :seq].numpy()})
            found["prefill_logits"].append(_compare(got[0], ref[0], precision))
            found["prefill_kv"] += [_compare(g, r, precision) for g, r in zip(got[1:], ref[1:])]
            past = got[1:]
        else:
            past = [r.astype(np.float16) if precision == "fp16" else r for r in ref[1:]]
        if full_graph is not None:
            got_all = full_graph.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            # every position of a longer sequence: more fp32 sums, so a wider band (an export bug is O(1))
            found["all_logits"].append(_compare(got_all, every, precision, widen=4.0))
        if dec is not None:
            feed = {"input_ids": ids[:, seq:].numpy(), "attention_mask": mask.numpy(), **dict(zip(past_names(n), past))}
            found["decode_logits"].append(_compare(dec.run(None, feed)[0], full, precision))
    # np.max propagates NaN (Python's max would hide it): a NaN is a failure, never a pass
    diffs = {k: float(np.max([d for d, _ in v])) for k, v in found.items() if v}
    bad = {k: (d, allowed) for k, v in found.items() for d, allowed in v if not d <= allowed}
    if bad:
        name, (diff, allowed) = next(iter(bad.items()))
        raise ExportParityError(
            f"ONNX export ({graphs.recipe['exporter']}) differs from torch: {name} max abs diff "
            f"{diff:.3g} > {allowed:.3g} allowed; try --exporter dynamo, or report this model"
        )
    return diffs


def _compare(got, ref, precision: str, widen: float = 1.0) -> tuple[float, float]:
    """(max abs diff, allowed diff) for one output (``widen`` x the precision's tolerance)."""
    atol, rtol = TOLERANCE[precision]
    ref = np.asarray(ref, dtype=np.float32)
    return _maxdiff(got, ref), widen * (atol + rtol * float(np.max(np.abs(ref))))


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32))))


def cpu_session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session on ``path``, quiet, with ``threads`` intra-op threads (0: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
