"""Post-training quantization recipes for exported ONNX graphs (ONNX Runtime's quantizers).

A *precision* names how a graph is computed: ``fp32`` / ``fp16`` (the export dtype) or one of the
recipes below, applied to the fp32 graph after export. The recipe, not just "int8", is what the
profiler times, the predictor is fitted for, the search proposes and the bundle ships, because
two INT8 recipes of the same graph differ by 2x in speed and by orders of magnitude in quality:

* ``int8``: ONNX Runtime's dynamic quantization (``quantize_dynamic``, QInt8 weights, per-tensor,
  activations quantized at run time to uint8 per tensor; the quantizer's default 7-bit weight
  range ``reduce_range``), MatMul/Gemm with a constant weight only — what a user gets from
  ``quantize_dynamic(model, out, weight_type=QInt8)``.
  Fastest prefill on CPU; costs the most quality.
* ``int8-pc``: the same with one 8-bit weight scale per output channel (full range: every x86 CPU
  with VNNI and every ARM CPU with dot-product instructions multiplies u8 x s8 without the
  saturation that ``reduce_range`` guards against), the tied LM head kept fp32 (measured on
  SmolLM2: perplexity 77.0 with the head quantized, 75.9 without; an earlier report of ~1e7 for
  per-channel was not reproduced with ONNX Runtime 1.32).
* ``int8-mixed``: ``int8-pc`` with the FFN down-projections in fp32 too: their inputs (gate x up)
  carry the activation outliers that per-tensor activation scales cannot represent; 1.05x the fp32
  perplexity of SmolLM2 instead of 1.5-1.9x, at ~0.55x of its prefill latency instead of ~0.37x.
* ``int8-pc7`` / ``int8-mixed7``: the same two with ORT's 7-bit weight range, for x86 CPUs with AVX2
  but no VNNI, where the full-range kernel saturates (:func:`saturation_risk`); ``compress``
  substitutes them there (:func:`host_precision`). Measured on SmolLM2 on such a CPU: 1.56x and
  1.04x the fp32 perplexity (int8: 1.90x), and on that CPU no dynamic-INT8 recipe was faster than
  fp32 for prefill (0.98-1.01x; 0.36-0.54x on the VNNI CPU): whether INT8 pays is a host property.
* ``int8-static`` / ``int8-static-mixed``: *static* INT8 (``quantize_static``, QDQ format): the
  activation ranges are fixed once, on calibration text (min/max over it, uint8 per tensor), instead
  of being measured on every call; weights per-channel 7-bit (safe on every x86 CPU); only the
  MatMuls with a constant weight are quantized and their outputs stay float, so ONNX Runtime fuses
  each into ``MatMulIntegerToFloat`` with a constant-scale ``QuantizeLinear`` in front (no run-time
  min/max reduction). LM head fp32; ``-mixed`` keeps the FFN down-projections fp32 too. The graph
  depends on its calibration data, so these recipes need token windows (:class:`StaticCalibration`):
  real text where quality matters (export, engine evaluation), synthetic ids where only latency
  does (profiling). The decode graph is calibrated on real KV caches from the fp32 prefill graph.
* ``w8`` / ``w4``: weight-only blockwise quantization (``MatMulNBits``, symmetric, block 32) with
  ``accuracy_level`` 4: activations are quantized to int8 per block inside the kernel, so
  prefill runs on integer dot products instead of dequantizing every weight to fp32 (the
  default accuracy level is lossless but slower than fp32 for prefill on CPU). Measured here:
  0.81x (w8, lossless) and 0.89x (w4, 1.6x perplexity) of fp32's prefill latency: these recipes
  are for memory-bound decode and memory footprint, not for compute-bound prefill.

Every recipe is a frozen dataclass whose dict is part of the export recipe (and so of the
``recipe_id`` that keys profiles and predictors). :func:`simulate` (``compressor.quant_sim``)
reproduces each recipe in torch for the search; the benchmark ``benchmarks/quantization.py``
measures how close that simulation is to the engine.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from compressor.errors import NaspruneError

FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class QuantRecipe:
    """How an fp32 ONNX graph becomes a quantized one. Every field changes speed or numbers."""

    name: str
    method: str  # "dynamic" (quantize_dynamic) | "static" (quantize_static, QDQ) | "weight_only" (MatMulNBits)
    bits: int = 8
    per_channel: bool = False
    reduce_range: bool = True  # dynamic: ORT's MatMulInteger weights use 7 bits (its default)
    block_size: int = 32  # weight_only
    accuracy_level: int = 4  # weight_only: 4 = int8 activations inside MatMulNBits
    exclude: tuple[str, ...] = ()  # roles kept in fp32 ("lm_head", "down_proj", ...)
    summary: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d


RECIPES: dict[str, QuantRecipe] = {
    "int8": QuantRecipe(
        "int8", "dynamic", summary="dynamic INT8 as onnxruntime does it by default (per-tensor, 7-bit weights)"
    ),
    "int8-pc": QuantRecipe(
        "int8-pc",
        "dynamic",
        per_channel=True,
        reduce_range=False,
        exclude=("lm_head",),
        summary="dynamic INT8, per-channel 8-bit weights, LM head fp32",
    ),
    "int8-mixed": QuantRecipe(
        "int8-mixed",
        "dynamic",
        per_channel=True,
        reduce_range=False,
        exclude=("lm_head", "down_proj"),
        summary="dynamic INT8, per-channel 8-bit weights; LM head and FFN down-projections fp32",
    ),
    "int8-pc7": QuantRecipe(
        "int8-pc7",
        "dynamic",
        per_channel=True,
        exclude=("lm_head",),
        summary="dynamic INT8, per-channel 7-bit weights, LM head fp32 (int8-pc for CPUs without VNNI)",
    ),
    "int8-mixed7": QuantRecipe(
        "int8-mixed7",
        "dynamic",
        per_channel=True,
        exclude=("lm_head", "down_proj"),
        summary="dynamic INT8, per-channel 7-bit weights; LM head and FFN down-projections fp32 (int8-mixed "
        "for CPUs without VNNI)",
    ),
    "int8-static": QuantRecipe(
        "int8-static",
        "static",
        per_channel=True,
        exclude=("lm_head",),
        summary="static INT8 (QDQ): activation ranges calibrated once (uint8 per tensor), per-channel 7-bit "
        "weights, LM head fp32",
    ),
    "int8-static-mixed": QuantRecipe(
        "int8-static-mixed",
        "static",
        per_channel=True,
        exclude=("lm_head", "down_proj"),
        summary="static INT8 (QDQ), per-channel 7-bit weights; LM head and FFN down-projections fp32",
    ),
    "w8": QuantRecipe("w8", "weight_only", bits=8, summary="weight-only 8-bit blockwise (MatMulNBits, block 32)"),
    "w4": QuantRecipe("w4", "weight_only", bits=4, summary="weight-only 4-bit blockwise (MatMulNBits, block 32)"),
}
PRECISIONS = FLOAT_PRECISIONS + tuple(RECIPES)


def recipe_for(precision: str) -> QuantRecipe | None:
    """The quantization recipe of ``precision`` (None for a float precision)."""
    if precision in FLOAT_PRECISIONS:
        return None
    if precision not in RECIPES:
        raise NaspruneError(f"unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    return RECIPES[precision]


def is_quantized(precision: str) -> bool:
    return recipe_for(precision) is not None


def needs_calibration(precision: str) -> bool:
    """True for the static recipes: their graph is a function of the calibration data."""
    recipe = RECIPES.get(precision)
    return recipe is not None and recipe.method == "static"


def export_dtype(precision: str) -> str:
    """The float dtype the graph is exported in before any quantization."""
    return precision if precision in FLOAT_PRECISIONS else "fp32"


# ---- host side --------------------------------------------------------------------------------
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set[str] | None:
    """The x86 CPU feature flags of this host (Linux ``/proc/cpuinfo``), None where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def saturation_risk(precision: str, flags: set[str] | None = None) -> str | None:
    """Why ``precision`` may give garbage through ONNX Runtime's CPU kernels on this host, or None.

    Full-range 8-bit weights (``reduce_range=False``) are only safe where the CPU multiplies u8 x s8
    with 32-bit accumulation (VNNI). On an AVX2-only x86 CPU, ORT's kernel adds pairs of u8 x s8
    products into int16 (``vpmaddubsw``), which saturates: measured on an AMD EPYC without VNNI,
    SmolLM2's ``int8-pc`` engine gave perplexity 1.2e7 where the same graph gave 64 on a VNNI CPU.
    The torch simulation of the search does not saturate, so it cannot see this; the engine
    evaluation of ``compress`` does. ``int8`` (7-bit weights, ORT's default) is the safe recipe there.
    """
    recipe = recipe_for(precision)
    if recipe is None or recipe.method != "dynamic" or recipe.reduce_range:
        return None
    flags = cpu_flags() if flags is None else flags
    if not flags or "avx2" not in flags or any(f in flags for f in VNNI_FLAGS):
        return None  # not x86, unknown, or u8 x s8 accumulates in 32 bits
    safe = HOST_SAFE.get(precision, "int8")
    return (
        f"'{precision}' uses full-range 8-bit weights, and this CPU has AVX2 but no VNNI: ONNX Runtime's "
        f"u8 x s8 kernel saturates int16 sums there (engine perplexity ~1e7 on SmolLM2); use '{safe}' on this host"
    )


# Full-range recipes and the 7-bit recipe that computes the same thing without saturating on AVX2-only
# CPUs (measured on SmolLM2 on such a CPU, test perplexity through the engine: int8-pc7 78.5 where
# int8-pc gave 1.2e7 there and 75.9 on a VNNI CPU; int8-mixed7 52.6, int8-mixed 52.9 on VNNI).
HOST_SAFE = {"int8-pc": "int8-pc7", "int8-mixed": "int8-mixed7"}


def host_precision(precision: str, flags: set[str] | None = None) -> tuple[str, str | None]:
    """The precision to run for ``precision`` on this CPU, and why it was replaced (None: it was not).

    A recipe that saturates here (:func:`saturation_risk`) is replaced by its 7-bit counterpart, so
    a run on such a host never profiles, searches or ships a (recipe, host) pair whose engine output
    is garbage, and a config written for a VNNI CPU still runs everywhere.
    """
    risk = saturation_risk(precision, flags)
    if risk is None or precision not in HOST_SAFE:
        return precision, None
    return HOST_SAFE[precision], risk


# ---- graph side -------------------------------------------------------------------------------
def _matmul_nodes(model) -> list:
    return [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]


def _is_role(node_name: str, role: str) -> bool:
    return f"/{role}/" in node_name or node_name.startswith(f"{role}/") or f"{role}." in node_name


def excluded_nodes(model, recipe: QuantRecipe) -> list[str]:
    """Names of the MatMul/Gemm nodes that ``recipe.exclude`` keeps in float.

    The LM head is the MatMul whose output is the graph's logits (after any Transpose of a tied
    embedding); other roles match the module path the exporter writes into node names
    (``/model/layers.3/mlp/down_proj/MatMul``).
    """
    names = []
    heads = _head_nodes(model) if "lm_head" in recipe.exclude else set()
    for node in _matmul_nodes(model):
        if node.name in heads or any(_is_role(node.name, r) for r in recipe.exclude if r != "lm_head"):
            names.append(node.name)
    return names


def _head_nodes(model) -> set[str]:
    """The MatMul/Gemm producing the logits output (possibly through a Reshape/Slice/Gather)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    wanted = {o.name for o in model.graph.output if o.name == "logits"}
    found: set[str] = set()
    frontier = list(wanted)
    for _ in range(8):  # a few pass-through ops at most between the head and the output
        nxt = []
        for name in frontier:
            node = producers.get(name)
            if node is None:
                continue
            if node.op_type in ("MatMul", "Gemm"):
                found.add(node.name)
            else:
                nxt += [i for i in node.input[:1]]
        frontier = nxt
    return found


@contextlib.contextmanager
def _quiet_quantizer():
    """ORT's quantizers log their advice at INFO/WARNING on the root logger; our CLI owns the console."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(src: Path, dst: Path, precision: str, calibration: StaticCalibration | None = None) -> dict:
    """Quantize the fp32 graph ``src`` into ``dst`` (a ``model.onnx`` path) by ``precision``'s recipe.

    ``calibration``: the token windows a static recipe fixes its activation ranges on (ignored by the
    other recipes, required by the static ones).
    Returns what was done (the recipe dict plus the nodes kept in float), recorded in manifests.
    External data beside ``src`` is read; ``dst`` is written as one file (graphs here are < 2 GB).
    """
    recipe = recipe_for(precision)
    if recipe is None:
        raise NaspruneError(f"precision '{precision}' is not a quantization recipe")
    if recipe.method == "static" and calibration is None:
        raise NaspruneError(f"'{precision}' is static quantization: it needs calibration text (token windows)")
    import onnx

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_quantizer():
        model = onnx.load(str(src), load_external_data=False)  # node names are all the exclusion needs
        exclude = excluded_nodes(model, recipe)
        if recipe.method == "dynamic":
            _dynamic(src, dst, recipe, exclude)
        elif recipe.method == "static":
            _static(src, dst, recipe, model, exclude, calibration)
        elif recipe.method == "weight_only":
            _weight_only(onnx.load(str(src)), dst, recipe, exclude)
        else:  # pragma: no cover - RECIPES is closed
            raise NaspruneError(f"unknown quantization method {recipe.method}")
    done = {**recipe.to_dict(), "nodes_kept_float": len(exclude)}
    if recipe.method == "static":
        done["calibration"] = calibration.describe()
    return done


def _dynamic(src: Path, dst: Path, recipe: QuantRecipe, exclude: list[str]) -> None:
    """``quantize_dynamic`` on the exported graph as it is. ORT's ``quant_pre_process`` (symbolic shape
    inference) was measured on SmolLM2's prefill graph: the quantized graph came out identical (211
    MatMulInteger, 121 DynamicQuantizeLinear, 60 float MatMul either way) and the step cost 1.6x the
    quantization itself (80 s vs 50 s on a busy 2-core machine), so it is skipped."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=exclude,
    )


# How much text a static recipe calibrates on, everywhere (engine graph and torch simulation alike):
# 16 windows of 128 tokens. MinMax ranges saturate quickly in the number of windows; more would only
# cost calibration time (one prefill per window, and one more per window for the decode graph).
CALIBRATION_WINDOWS, CALIBRATION_SEQ = 16, 128


def calibration_windows(tokenizer, data: str, online: bool = False):
    """The token windows [N, T] static recipes calibrate on, from the text ``data`` (a path or
    ``builtin:NAME``): the first ``CALIBRATION_WINDOWS`` x ``CALIBRATION_SEQ`` tokens."""
    from compressor.data import read_source, resolve_data
    from compressor.evaluate import token_windows

    kind, text = read_source(resolve_data(data), online)
    if kind != "text":
        raise NaspruneError(f"static quantization calibrates on plain text (.txt), not {data}")
    return token_windows(tokenizer, text, CALIBRATION_SEQ, CALIBRATION_WINDOWS * CALIBRATION_SEQ)


def static_calibration(tokenizer, data: str, online: bool = False) -> StaticCalibration:
    """:class:`StaticCalibration` on the calibration text ``data`` (see :func:`calibration_windows`)."""
    windows = calibration_windows(tokenizer, data, online)
    return StaticCalibration(windows.numpy(), str(data))


@dataclass(frozen=True)
class StaticCalibration:
    """Token windows ``[N, T]`` (int64) that a static recipe fixes its activation ranges on.

    ``prefill``: the fp32 prefill graph of the same model; a decode graph is calibrated on the KV
    caches it produces for ``window[:-1]`` and the window's last token (the state decode really
    sees). Without it (``synthetic``: profiling, where only the graph's speed matters) the past is
    zeros. ``source`` says where the tokens came from, for the manifest.
    """

    windows: object  # numpy array or torch tensor [N, T]
    source: str
    prefill: Path | None = None
    synthetic: bool = False

    @staticmethod
    def synthetic_ids(windows: int = 2, seq: int = 16, seed: int = 0) -> StaticCalibration:
        """Random token ids: the static graph's *speed* does not depend on its ranges (profiling)."""
        import numpy as np

        ids = np.random.default_rng(seed).integers(3, 100, size=(windows, seq), dtype=np.int64)
        return StaticCalibration(ids, "synthetic token ids (latency only)", synthetic=True)

    def with_prefill(self, prefill: Path | None) -> StaticCalibration:
        return StaticCalibration(self.windows, self.source, prefill, self.synthetic)

    def describe(self) -> dict:
        import numpy as np

        n, t = np.asarray(self.windows).shape
        return {"source": self.source, "windows": int(n), "seq_len": int(t), "synthetic": self.synthetic}

    def feeds(self, model) -> list[dict]:
        """One feed per window for the ONNX graph ``model`` (its inputs decide prefill vs decode)."""
        import numpy as np

        windows = np.asarray(self.windows, dtype=np.int64)
        inputs = {i.name: i for i in model.graph.input}
        pasts = [n for n in inputs if n.startswith("past_key_values.")]
        if not pasts:
            return [{"input_ids": w[None], "attention_mask": np.ones((1, w.size), np.int64)} for w in windows]
        if windows.shape[1] < 2:
            raise NaspruneError("calibrating a decode graph needs windows of at least 2 tokens")
        if self.prefill is None and not self.synthetic:
            raise NaspruneError("calibrating a decode graph on real text needs the fp32 prefill graph (real KV caches)")
        from compressor.engine_quality import session as ort_session  # (it imports this module)

        feeds = []
        session = ort_session(self.prefill) if self.prefill is not None else None
        for w in windows:
            head, last = w[None, :-1], w[None, -1:]
            if session is not None:
                outs = session.run(None, {"input_ids": head, "attention_mask": np.ones_like(head)})
                present = dict(zip([o.name for o in session.get_outputs()], outs))
                past = {p: present[p.replace("past_key_values.", "present.", 1)] for p in pasts}
            else:
                past = {p: np.zeros(_past_shape(inputs[p], head.shape[1]), np.float32) for p in pasts}
            feeds.append({"input_ids": last, "attention_mask": np.ones((1, w.size), np.int64), **past})
        return feeds


def _past_shape(value_info, past: int) -> tuple[int, ...]:
    """[1, kv_heads, past, head_dim] from a past_key_values input's declared shape."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]
    return (1, dims[1], past, dims[3])


def _static(src: Path, dst: Path, recipe: QuantRecipe, model, exclude: list[str], calibration) -> None:
    """``quantize_static`` (QDQ) of the MatMul/Gemm nodes with a constant weight, outputs left float.

    Only weight MatMuls: ORT's default would also quantize the attention's activation x activation
    MatMuls and every MatMul output (``QLinearMatMul``), two more roundings per layer that dynamic
    INT8 does not make. With outputs excluded, ORT fuses ``DequantizeLinear -> MatMul`` into
    ``MatMulIntegerToFloat`` (checked by the tests), the same integer kernel as dynamic INT8 minus
    its per-call range reduction. Ranges: MinMax over the calibration windows (ORT's default)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    skip = set(exclude)
    nodes = [n.name for n in _matmul_nodes(model) if n.input[1] in constants and n.name not in skip]
    feeds = calibration.feeds(model)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=nodes,
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
    )


def _weight_only(model, dst: Path, recipe: QuantRecipe, exclude: list[str]) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        model,
        bits=recipe.bits,
        block_size=recipe.block_size,
        is_symmetric=True,
        accuracy_level=recipe.accuracy_level,
        nodes_to_exclude=exclude,
    )
    q.process()
    onnx.save_model(q.model.model, str(dst))


def quantize_graph_dir(
    src_dir: Path,
    dst_dir: Path,
    precision: str,
    graphs: tuple[str, ...],
    calibration: StaticCalibration | None = None,
) -> dict[str, Path]:
    """Quantize ``src_dir/<graph>/model.onnx`` for each graph into ``dst_dir/<graph>/model.onnx``.
    A static recipe calibrates the decode graph on ``src_dir/prefill``'s KV caches when that exists."""
    from compressor.onnx_export import GRAPH_FILE

    prefill = Path(src_dir) / "prefill" / GRAPH_FILE
    if calibration is not None and calibration.prefill is None and prefill.exists():
        calibration = calibration.with_prefill(prefill)
    out = {}
    for g in graphs:
        target = Path(dst_dir) / g / GRAPH_FILE
        if target.parent.exists():
            shutil.rmtree(target.parent)
        quantize_graph(Path(src_dir) / g / GRAPH_FILE, target, precision, calibration)
        out[g] = target
    return out
