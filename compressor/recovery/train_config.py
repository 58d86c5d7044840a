"""Training settings and the step plan: what a run does, fixed before any model is loaded.

:class:`TrainConfig` (validated on construction, loadable from YAML) and the pure functions of it
that more than the trainer need: which examples a step reads (:func:`batch_indices`, so resume is
exact and refine can predict the teacher-cache windows with :func:`windows_needed`) and the mixed
precision a run resolves to (part of the teacher cache's key). Kept apart from the training loop so
planners (refine, the pipeline) read them without importing the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from compressor.core.errors import NaspruneError

STRATEGIES: dict[str, tuple[bool, str | None]] = {
    "standard": (False, None),
    "random": (False, "random"),
    "grid-params": (False, "grid-params"),
    "importance-random": (True, "random"),
    "importance-grid-params": (True, "grid-params"),
    "importance-calibrate-mag": (True, "calibrate-mag"),
}
DISTILL_MODES = ("none", "logits")
TEACHERS = ("original", "largest")


@dataclass
class TrainConfig:
    strategy: str = "importance-calibrate-mag"
    steps: int = 200
    max_minutes: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    max_train_tokens: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    num_sampled: int = 1
    num_bins: int = 10
    calib_candidates: int = 32
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    untie_lm_head: bool = False
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    log_every: int = 5
    seed: int = 0
    prompt_format: str = "auto"
    distill: str = "none"  # "none" | "logits": add logit KD (compressor.recovery.distill) to every sub-network's loss
    teacher: str = "original"  # "original": frozen start model, cached top-k | "largest": in-place, detached
    distill_alpha: float = 1.0  # L = alpha * KD + (1 - alpha) * CE (1: pure KD as in Minitron / BigNAS)
    distill_topk: int = 64  # teacher tokens kept per position by the cache (+ one tail bucket)
    distill_temperature: float = 1.0  # softmax temperature of teacher and student; KD scaled by T^2
    # quantization-aware training: every forward runs this precision's recipe simulated (compressor.elastic.quant_sim,
    # straight-through rounding), so the weights learn to survive the engine's quantization; None: float
    quantization: str | None = None
    # intermediate-state distillation (compressor.recovery.distill_states): weight of the normalized MSE between the
    # student's residual stream after each block and the teacher's at the same point, added to the loss.
    # Needs a single extracted student and its unpruned parent as teacher (refine); 0: logits only
    distill_states: float = 0.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise NaspruneError(f"unknown strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise NaspruneError(f"mixed_precision must be auto, no, bf16 or fp16 (got {self.mixed_precision})")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "num_bins", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise NaspruneError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.distill not in DISTILL_MODES:
            raise NaspruneError(f"distill must be one of {', '.join(DISTILL_MODES)} (got {self.distill!r})")
        if self.quantization is not None:
            from compressor.core.precisions import needs_calibration, recipe_for

            if recipe_for(self.quantization) is None:
                raise NaspruneError(f"quantization must be a quantization recipe, not {self.quantization!r}")
            if needs_calibration(self.quantization):
                raise NaspruneError(
                    f"quantization-aware training with the static recipe {self.quantization!r} is not supported "
                    "(its activation ranges are calibrated on the trained weights at export); train in float"
                )
        if not (
            isinstance(self.distill_states, (int, float))
            and math.isfinite(self.distill_states)
            and self.distill_states >= 0
        ):
            raise NaspruneError(f"distill_states must be a number >= 0 (got {self.distill_states})")
        if self.distill_states > 0 and (
            self.distill != "logits" or self.teacher != "original" or self.strategy != "standard"
        ):
            raise NaspruneError(
                "distill_states needs distill 'logits' from teacher 'original' on one sub-network (strategy "
                "'standard'): it distils an extracted student from its unpruned parent, as refine does"
            )
        if self.teacher not in TEACHERS:
            raise NaspruneError(f"teacher must be one of {', '.join(TEACHERS)} (got {self.teacher!r})")
        if not (isinstance(self.distill_alpha, (int, float)) and 0.0 <= self.distill_alpha <= 1.0):
            raise NaspruneError(f"distill_alpha must be in [0, 1] (got {self.distill_alpha})")
        if isinstance(self.distill_topk, bool) or not isinstance(self.distill_topk, int) or self.distill_topk < 1:
            raise NaspruneError(f"distill_topk must be an integer >= 1 (got {self.distill_topk})")
        if not (
            isinstance(self.distill_temperature, (int, float))
            and math.isfinite(self.distill_temperature)
            and self.distill_temperature > 0
        ):
            raise NaspruneError(f"distill_temperature must be > 0 (got {self.distill_temperature})")
        if self.distill == "logits" and self.teacher == "largest" and self.strategy == "standard":
            raise NaspruneError(
                "teacher 'largest' needs a sandwich strategy (standard trains only the largest "
                "sub-network, which has no teacher); use teacher 'original' or another strategy"
            )

    @staticmethod
    def load(path: Path | None = None, overrides: dict | None = None) -> TrainConfig:
        d = {}
        if path is not None:
            import yaml

            if not Path(path).is_file():
                raise NaspruneError(f"config file {path} does not exist")
            d = yaml.safe_load(Path(path).read_text()) or {}
            d = d.get("train", d)
        d.update(overrides or {})
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NaspruneError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return TrainConfig(**d)


def batch_indices(step: int, micro: int, cfg: TrainConfig, n: int, world: int = 1, rank: int = 0) -> np.ndarray:
    """Example indices of one micro-batch on one process: a pure function of (seed, step, rank),
    so resume is exact and DDP processes see disjoint slices of the same global batch."""
    start = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    out = []
    for g in range(start, start + cfg.batch_size):
        epoch, pos = divmod(g, n)
        out.append(np.random.default_rng([cfg.seed, epoch]).permutation(n)[pos])
    return np.array(out)


def windows_needed(cfg: TrainConfig, n: int, world: int = 1) -> np.ndarray:
    """Every example index that ``batch_indices`` yields over steps ``[0, cfg.steps)`` on all
    ``world`` processes: the global positions ``0 .. steps*grad_accum*world*batch_size - 1``
    of the per-epoch permutations (so all ``n`` once a run covers an epoch)."""
    total = cfg.steps * cfg.grad_accum * world * cfg.batch_size
    if total >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([cfg.seed, 0]).permutation(n)[:total])


def resolve_mixed_precision(cfg: TrainConfig) -> str:
    """accelerate's ``mixed_precision`` for ``cfg`` ("auto": bf16 on a CUDA device that has it, else "no");
    it is part of the teacher cache's key, so whoever predicts that key (refine's plan) must use this."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
