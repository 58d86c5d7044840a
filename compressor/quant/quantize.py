"""Post-training quantization of exported ONNX graphs with ONNX Runtime's quantizers.

The recipes themselves (what each precision means, and why) are the catalogue in
``compressor.core.precisions``; this module applies them to a graph and knows the host side
(which recipes saturate on which CPUs).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from compressor.core.errors import NaspruneError
from compressor.core.precisions import (
    QuantRecipe,
    recipe_for,
)

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
    """The token windows [N, T] static recipes calibrate on, from ``data`` (a path or ``builtin:NAME``; .txt, or
    an Alpaca .jsonl joined as text): :func:`compressor.core.data.calibration_windows` of the first
    ``CALIBRATION_WINDOWS`` x ``CALIBRATION_SEQ`` tokens; kept here for its callers (search, benchmarks)."""
    from compressor.core.data import calibration_windows as token_calibration_windows

    return token_calibration_windows(tokenizer, data, CALIBRATION_SEQ, CALIBRATION_WINDOWS * CALIBRATION_SEQ, online)


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
        from compressor.quant.onnx_export import cpu_session

        feeds = []
        session = cpu_session(self.prefill) if self.prefill is not None else None
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
    from compressor.quant.onnx_export import GRAPH_FILE

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
