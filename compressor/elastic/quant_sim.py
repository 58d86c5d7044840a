"""Torch simulation of the ONNX Runtime quantization recipes (``compressor.quant.quantize``), for the search.

The search scores hundreds of (sub-network, precision) candidates; exporting and quantizing each
one to measure it through the engine would cost ~20 s a candidate here. Instead every linear layer
of the super-network forward (all go through ``ops.elastic_linear``) can run the
recipe's arithmetic in fp32 on the *sliced* weight, which is exactly what the extracted
sub-network's graph quantizes:

* dynamic INT8 (``MatMulInteger``): activations asymmetric uint8 over the whole tensor of one
  sequence (``DynamicQuantizeLinear``; the engine is run at batch 1), weights symmetric int8 in
  ORT's reduced range [-64, 64] per tensor or per output channel; integer products are exact, so
  dequantize-then-matmul in fp32 is the same function up to fp32 summation order.
* static INT8 (QDQ, ``MatMulIntegerToFloat``): the same weights as dynamic per-channel; activations
  uint8 with a scale and zero point fixed by the min/max of that layer's input over the calibration
  windows (ORT's MinMax calibrator), observed through the same sub-network before it is scored
  (``simulate(..., calibrate=...)``).
* weight-only blockwise (``MatMulNBits``, symmetric, block B along the input dimension): the
  block's signed extreme maps to -2^(bits-1); with ``accuracy_level`` 4 the activations are
  quantized symmetric int8 per block of B inputs inside the kernel.

Rounding is a straight-through estimator (forward: round; backward: identity), so the same
simulation trains weights for the recipe they will ship in (quantization-aware refine:
``TrainConfig.quantization``); outside training it computes exactly the rounded values.

It is a simulation: rounding ties, fused kernels and saturation corners can differ. The engine
remains the judge — bundles are evaluated through the quantized graph, and
``benchmarks/quantization.py`` reports simulated vs engine perplexity per recipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compressor.core.errors import NaspruneError
from compressor.core.precisions import QuantRecipe, recipe_for


@dataclass(frozen=True)
class _Simulation:
    recipe: QuantRecipe
    excluded: frozenset[int]  # id() of modules kept in float
    ranges: dict | None = None  # static recipes: id(module) -> (min, max) of its input over the calibration


@dataclass
class _Observer:
    """Records each quantized linear's input range (min, max over everything it sees); computes float."""

    excluded: frozenset[int]
    ranges: dict = field(default_factory=dict)

    def observe(self, module, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().amin()), float(x.detach().amax())
        old = self.ranges.get(id(module))
        self.ranges[id(module)] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))


# A plain module global, not a ContextVar: torch.compile(fullgraph=True) traces a global's None check
# (and guards on it) but not ContextVar.get. The search and evaluation that set it are single-threaded.
_ACTIVE: _Simulation | None = None


def linear(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` unless a simulation is active for this module (the hook ``elastic_linear`` calls)."""
    sim = _ACTIVE
    if sim is None or id(module) in sim.excluded:
        return F.linear(x, weight, bias)
    if isinstance(sim, _Observer):
        sim.observe(module, x)
        return F.linear(x, weight, bias)
    r = sim.recipe
    if r.method == "dynamic":
        return F.linear(_dynamic_activation(x), _symmetric_weight(weight, r), bias)
    if r.method == "static":
        lo, hi = sim.ranges[id(module)]
        return F.linear(_static_activation(x, lo, hi), _symmetric_weight(weight, r), bias)
    xq = _blockwise_activation(x, r.block_size) if r.accuracy_level == 4 else x
    return F.linear(xq, _blockwise_weight(weight, r.bits, r.block_size), bias)


@contextlib.contextmanager
def simulate(precision: str, model: torch.nn.Module, calibrate: Callable[[], object] | None = None):
    """Run ``model``'s elastic linears as ``precision``'s recipe inside the block (no-op for floats).

    ``calibrate``: runs the calibration windows through ``model`` as it is selected now (a static
    recipe's activation ranges are observed during that call, then fixed, as ORT's calibrator does on
    the extracted graph); required for static recipes, ignored by the others."""
    recipe = recipe_for(precision)
    if recipe is None:
        yield
        return
    excluded = frozenset(
        id(m) for name, m in model.named_modules() if any(role in name.split(".") for role in recipe.exclude)
    )
    global _ACTIVE
    previous = _ACTIVE
    ranges = None
    try:
        if recipe.method == "static":
            if calibrate is None:
                raise NaspruneError(f"simulating '{precision}' needs calibration windows (a static recipe)")
            observer = _ACTIVE = _Observer(excluded)
            with torch.no_grad():
                calibrate()
            ranges = observer.ranges
        _ACTIVE = _Simulation(recipe, excluded, ranges)
        yield
    finally:
        _ACTIVE = previous


# ---- the arithmetic ------------------------------------------------------------------------
def _round(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _per_sequence_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(range(1, x.dim())) if x.dim() > 2 else tuple(range(x.dim()))
    lo = x.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = x.amax(dim=dims, keepdim=True).clamp(min=0)
    return lo, hi


def _dynamic_activation(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear: uint8, range [min(x, 0), max(x, 0)] of the tensor, then dequantized."""
    lo, hi = _per_sequence_range(x.detach())
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale).clamp(0, 255)
    q = torch.clamp(_round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def _static_activation(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """QuantizeLinear with calibrated uint8 parameters (ORT's compute_scale_zp, asymmetric): range
    [min(lo, 0), max(hi, 0)], scale = range / 255, zero point = round(-min / scale); values outside
    the calibrated range saturate at 0 / 255."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = float(min(max(round(-lo / scale), 0), 255))
    q = torch.clamp(_round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def _symmetric_weight(w: torch.Tensor, r: QuantRecipe) -> torch.Tensor:
    """int8 symmetric weight, ORT's quantize_data: scale = 2 absmax / (qmax - qmin)."""
    qmin, qmax = (-64, 64) if r.reduce_range else (-127, 127)
    absmax = w.detach().abs().amax(dim=1, keepdim=True) if r.per_channel else w.detach().abs().amax()
    scale = (2 * absmax / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.clamp(_round(w / scale), qmin, qmax) * scale


def _blocks(t: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    k = t.shape[-1]
    pad = (-k) % block
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], -1, block), k


def _blockwise_weight(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """MatMulNBits symmetric: per block of ``block`` inputs of each output, signed extreme -> -2^(bits-1)."""
    b, k = _blocks(w.detach(), block)
    idx = b.abs().argmax(dim=-1, keepdim=True)
    extreme = torch.gather(b, -1, idx)
    half = 2 ** (bits - 1)
    scale = extreme / -half
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    wb, _ = _blocks(w, block)
    q = torch.clamp(_round(wb / scale), -half, half - 1)
    return (q * scale).reshape(*w.shape[:-1], -1)[..., :k]


def _blockwise_activation(x: torch.Tensor, block: int) -> torch.Tensor:
    """accuracy_level 4: int8 symmetric per block of ``block`` inputs of each row."""
    b, k = _blocks(x, block)
    scale = (b.detach().abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.clamp(_round(b / scale), -127, 127)
    return (q * scale).reshape(*x.shape[:-1], -1)[..., :k]
