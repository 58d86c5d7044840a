"""Quality measured through the engine that ships: next-token loss of an ONNX graph (fp32 or quantized).

A quantized engine computes a different function than the torch model it came from, so its
quality is measured by running it, never assumed: the sub-network is exported as the full-sequence
``logits`` graph (``compressor.quant.onnx_export``), quantized by the very recipe the bundle ships
(``compressor.quant.quantize``), and run window by window at batch 1 (the batch size the latency is
timed at; dynamic quantization ranges depend on the batch). One window of 128 tokens of a 135M
model takes ~0.1-0.2 s here, so a few thousand test tokens cost seconds, not the minutes a
token-by-token decode evaluation costs.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compressor.core.precisions import export_dtype, is_quantized
from compressor.quant.onnx_export import GRAPH_FILE, ExportRecipe, cpu_session, export_graphs
from compressor.quant.quantize import StaticCalibration, quantize_graph


@dataclass
class EngineQuality:
    precision: str
    loss: float
    tokens: int
    quantization: dict | None

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "loss": self.loss,
            "ppl": self.ppl,
            "tokens": self.tokens,
            "quantization": self.quantization,
        }


def graph_mean_loss(graph: Path, windows: torch.Tensor, threads: int = 0) -> tuple[float, int]:
    """Mean next-token loss of a full-logits graph over ``windows`` [N, T], one window per run."""
    sess = cpu_session(graph, threads)
    total, count = 0.0, 0
    for w in windows:
        ids = w[None].numpy().astype(np.int64)
        logits = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        total += F.cross_entropy(torch.from_numpy(logits[:-1]).float(), w[1:], reduction="sum").item()
        count += len(w) - 1
    return total / max(count, 1), count


def logits_graph(
    model, directory: Path, precision: str, calibration: StaticCalibration | None = None
) -> tuple[Path, dict | None]:
    """Export ``model``'s full-logits graph into ``directory`` and quantize it by ``precision``
    (a static recipe calibrates on ``calibration``: the same windows its bundle's engine used)."""
    directory = Path(directory)
    exported = export_graphs(model, directory / "fp32", ExportRecipe(precision=export_dtype(precision)), ("logits",))
    graph = exported.paths["logits"]
    if not is_quantized(precision):
        return graph, None
    target = directory / precision / "logits" / GRAPH_FILE
    done = quantize_graph(graph, target, precision, calibration)
    return target, done


def engine_qualities(
    model,
    windows: torch.Tensor,
    precisions,
    work_dir: Path | None = None,
    calibration: StaticCalibration | None = None,
) -> dict[str, EngineQuality]:
    """Loss of ``model`` (an extracted sub-network or a checkpoint) through the ONNX Runtime CPU
    engine at each of ``precisions`` on ``windows``. The fp32 logits graph is exported once and
    quantized per recipe (export is the expensive step); graphs live in a temporary dir under
    ``work_dir``. ``calibration``: for static recipes (never the evaluation ``windows``)."""
    out: dict[str, EngineQuality] = {}
    with tempfile.TemporaryDirectory(prefix="nasprune-quality-", dir=work_dir) as tmp:
        base = None
        for precision in precisions:
            if is_quantized(precision):
                if base is None:
                    base, _ = logits_graph(model, Path(tmp), "fp32")
                graph = Path(tmp) / precision / "logits" / GRAPH_FILE
                done = quantize_graph(base, graph, precision, calibration)
            else:
                graph, done = logits_graph(model, Path(tmp) / precision, precision, calibration)
            loss, tokens = graph_mean_loss(graph, windows)
            out[precision] = EngineQuality(precision, loss, tokens, done)
    return out


def engine_quality(
    model,
    windows: torch.Tensor,
    precision: str,
    work_dir: Path | None = None,
    calibration: StaticCalibration | None = None,
) -> EngineQuality:
    """:func:`engine_qualities` for one precision."""
    return engine_qualities(model, windows, [precision], work_dir, calibration)[precision]
