"""The precision catalogue: every precision nasprune knows, defined once.

The profiler, the predictors, the search, the quantizer, the quantization simulation and the bundle
all read this module; adding a recipe here is the one change that makes it available everywhere
(``compressor.quant.quantize`` applies it to a graph, ``compressor.elastic.quant_sim`` simulates it).

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
``recipe_id`` that keys profiles and predictors). :func:`simulate` (``compressor.elastic.quant_sim``)
reproduces each recipe in torch for the search; the benchmark ``benchmarks/quantization.py``
measures how close that simulation is to the engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from compressor.core.errors import NaspruneError

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


# weight bytes per parameter by precision (every recipe above;
# int8-mixed keeps the FFN down-projections and the head in fp32, so ~1.7 bytes on SmolLM2)
BYTES_PER_PARAM = {
    "fp32": 4,
    "fp16": 2,
    "bf16": 2,
    "int8": 1,
    "int8-pc": 1,
    "int8-pc7": 1,
    "int8-mixed": 1.7,
    "int8-mixed7": 1.7,
    "int8-static": 1,
    "int8-static-mixed": 1.7,
    "w8": 1,
    "w4": 0.5,
}

# what a bundle may ship: the export dtypes an engine takes, and every recipe
BUNDLE_VARIANTS = ("fp32", "fp16", *RECIPES)
