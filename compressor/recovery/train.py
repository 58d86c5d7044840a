"""Super-network fine-tuning with the sandwich rule (largest + sampled + smallest per step).

Strategies (the paper's six):

=========================== ============================ ==========================
strategy                    importance permutation first sub-networks per step
=========================== ============================ ==========================
standard                    no                           the full model only
random                      no                           sandwich, uniform sampler
grid-params                 no                           sandwich, parameter-bin grid
importance-random           yes                          sandwich, uniform sampler
importance-grid-params      yes                          sandwich, parameter-bin grid
importance-calibrate-mag    yes                          sandwich, best mean-|w| per bin
=========================== ============================ ==========================

Gradients of the sandwich's sub-networks are summed (each loss divided by the number of
sub-networks and accumulation steps) before one optimizer step. ``--lora`` trains LoRA adapters
on every linear (peft for config, persistence and merge; slicing in our forward); a tied lm_head
is skipped unless ``--untie-lm-head`` gives it its own weight. accelerate handles devices,
mixed precision and multi-GPU DDP (``accelerate launch -m nasprune train ...``).

Resume is exact: the batch of every step is a pure function of (seed, step), and the checkpoint
holds the trainable weights, optimizer, scheduler, sampler RNG and torch RNG.

Recovery by distillation (``distill="logits"``, see :mod:`compressor.recovery.distill`): each
sub-network's loss becomes ``alpha * KD + (1 - alpha) * CE``. With ``teacher="original"`` the
teacher is the unpruned permuted model as it is when the :class:`Trainer` is built (before any
step or checkpoint load), its top-k targets cached on disk once for every window the run will
read; with ``teacher="largest"`` the sandwich's largest sub-network teaches the others in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compressor.core.data import IGNORE, TokenizedData, load_data
from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import LoadedModel, ModelMeta, cache_dir, load_model, save_model_dir, versions
from compressor.elastic.quant_sim import simulate
from compressor.elastic.search_space import SubNetwork
from compressor.elastic.supernet import SuperNetwork
from compressor.recovery.distill import TeacherCache, inplace_targets, kd_loss, kd_loss_full, state_dict_hash
from compressor.recovery.distill_states import state_loss, teacher_layer_targets, teacher_states
from compressor.recovery.sampling import make_sampler

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


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def untie_lm_head(model) -> None:
    """Give lm_head its own copy of the embedding so adapting it cannot change the embedding."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(emb.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}


def add_lora(model, cfg: TrainConfig) -> list[str]:
    """Wrap every linear in a peft LoRA layer (lm_head only when untied). Returns the targets."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if getattr(model.config, "tie_word_embeddings", False):
        names -= {"lm_head", "embed_out"}
    targets = sorted(names)
    get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none"
        ),
    )
    return targets


def merge_lora(model):
    """Fold adapters into the base weights; returns the plain HF model."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, child = name.rsplit(".", 1) if "." in name else ("", name)
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class Trainer:
    """One super-network training run; checkpoints to ``work_dir`` and resumes exactly.

    Loss of one step (the sandwich of n sub-networks, ``grad_accum`` micro-batches)::

        L = 1/(n * grad_accum) * sum_micro sum_s L_s
        L_s = CE_s                                   distill == "none"
        L_s = alpha * KD_s + (1 - alpha) * CE_s      distill == "logits" (every s; for
              teacher "largest" the largest itself has no teacher: L_largest = CE_largest)

    Balancing: every term is a per-token mean (CE over supervised tokens; KD's KL over the same
    tokens, times T^2 so its gradient scale does not depend on the temperature), every L_s is a
    convex combination (weights sum to 1) and the sub-networks are averaged, not summed. So each
    sub-network has weight 1/n whatever the mode: in in-place distillation the largest's CE (the
    only loss on ground truth at alpha = 1, and typically several times larger than a KL) counts
    as one sub-network's loss, not as an extra term on top of the students', and changing
    ``num_sampled`` or alpha does not change the learning rate the largest effectively sees.

    ``teacher_cache_dir`` (``teacher == "original"``): where the teacher's targets are cached
    (default ``$NASPRUNE_CACHE/teacher``); keyed by content, so any run on the same tokens and
    teacher reuses them.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        data: TokenizedData,
        cfg: TrainConfig,
        work_dir: Path,
        teacher_cache_dir: Path | None = None,
        log=None,
        teacher: LoadedModel | None = None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.loaded, self.data, self.cfg, self.work_dir = loaded, data, cfg, Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        model = loaded.model
        cached_teacher = cfg.distill == "logits" and cfg.teacher == "original"
        # the teacher is the model as loaded (permuted, before untie/LoRA, which preserve its function)
        if teacher is not None and not cached_teacher:
            raise NaspruneError("an external teacher needs distill 'logits' with teacher 'original'")
        # an external teacher (refine: the unpruned parent of an extracted student) replaces the start model
        self._external_teacher = teacher.supernet().eval() if teacher is not None else None
        self._state_teacher, self._state_targets = None, []
        if cfg.distill_states > 0:
            if teacher is None:
                raise NaspruneError(
                    "distill_states needs the unpruned parent as teacher (refine passes it): the student's "
                    "own start weights have no other depth to learn from"
                )
            self._state_teacher = self._external_teacher
            self._state_targets = teacher_layer_targets(
                student_kept_layers(loaded, teacher), teacher.model.config.num_hidden_layers
            )
        teacher_hash = state_dict_hash(teacher.model if teacher is not None else model) if cached_teacher else None
        if cfg.untie_lm_head:
            untie_lm_head(model)
        self.supernet = SuperNetwork(model, loaded.meta.space_config, loaded.meta.layer_ranking)
        self.supernet.gradient_checkpointing = cfg.gradient_checkpointing
        self.lora_targets = add_lora(model, cfg) if cfg.lora else []
        if not cfg.lora:
            for p in model.parameters():
                p.requires_grad_(True)
        cuda = torch.cuda.is_available()
        precision = resolve_mixed_precision(cfg)
        self.accelerator = Accelerator(
            mixed_precision=precision,
            cpu=not cuda,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        params = [p for p in self.supernet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

        def schedule(step):
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            self.supernet, self.optimizer, self.scheduler
        )
        _, sampler_name = STRATEGIES[cfg.strategy]
        self.sampler = (
            make_sampler(
                sampler_name, self.supernet.space, cfg.seed, cfg.num_bins, cfg.calib_candidates, supernet=self.supernet
            )
            if sampler_name
            else None
        )
        self.step = 0
        self.log_path = self.work_dir / "train_log.jsonl"
        self.ckpt_path = self.work_dir / "checkpoint.pt"
        self.teacher_cache: TeacherCache | None = None
        self.teacher_fill: dict | None = None
        if cached_teacher:
            acc = self.accelerator
            self.teacher_cache = TeacherCache(
                Path(teacher_cache_dir) if teacher_cache_dir else cache_dir() / "teacher",
                data.input_ids,
                data.attention_mask,
                teacher_hash,
                k=cfg.distill_topk,
                temperature=cfg.distill_temperature,
                precision=acc.mixed_precision,
                rank=acc.process_index,
                world=acc.num_processes,
                barrier=acc.wait_for_everyone,
            )
            needed = windows_needed(cfg, len(data), acc.num_processes)
            self.teacher_fill = self.teacher_cache.ensure(
                needed, self._teacher_logits, batch_size=cfg.batch_size, device=acc.device, log=log
            )
        self._external_teacher = None  # its targets are on disk now: free it (the state loss keeps its own)

    def _teacher_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen teacher: the largest sub-network with the weights the trainer started with, or the
        external teacher (the unpruned parent when a single extracted sub-network is refined)."""
        if self._external_teacher is not None:
            parent = self._external_teacher.to(self.accelerator.device)
            with torch.no_grad(), self.accelerator.autocast():
                return parent(ids, mask if self.data.kind == "instruct" else None)
        was_training = self.supernet.training
        self.supernet.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast(), self.supernet.selected(self.supernet.space.largest()):
                return self.supernet(ids, mask if self.data.kind == "instruct" else None)
        finally:
            self.supernet.train(was_training)

    # ---- sub-networks per step ----------------------------------------------------------------
    def sandwich(self) -> list[SubNetwork]:
        space = self.supernet.space
        if self.sampler is None:
            return [space.largest()]
        return [space.largest(), *self.sampler.sample_many(self.cfg.num_sampled), space.smallest()]

    # ---- checkpointing ------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.lora:
            return lora_state(self.supernet.model)
        return {k: v.detach().clone() for k, v in self.supernet.model.state_dict().items()}

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        state = {
            "step": self.step,
            "model": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler else None,
            "torch_rng": torch.get_rng_state(),
            "config": asdict(self.cfg),
        }
        tmp = self.ckpt_path.with_name(f".checkpoint.pt.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> None:
        """A process killed mid-``torch.save`` leaves ``.checkpoint.pt.tmp-PID`` (GBs); the complete
        checkpoint is the one that counts, so the partial files go."""
        for stale in self.work_dir.glob(".checkpoint.pt.tmp-*"):
            stale.unlink(missing_ok=True)

    def load_checkpoint(self) -> None:
        if not self.ckpt_path.exists():
            raise NaspruneError(f"--resume: no checkpoint at {self.ckpt_path}; run without --resume to start")
        try:
            # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise NaspruneError(
                f"checkpoint {self.ckpt_path} is corrupt ({type(e).__name__}); delete it and restart"
            ) from None
        saved = {
            k: v
            for k, v in state["config"].items()
            if k not in ("steps", "max_minutes", "checkpoint_every", "log_every")
        }
        now = {k: v for k, v in asdict(self.cfg).items() if k in saved}
        if saved != now:
            diff = sorted(k for k in saved if saved[k] != now[k])
            raise NaspruneError(f"--resume with different settings {diff} than the checkpoint; use the same settings")
        self.supernet.model.load_state_dict(state["model"], strict=not self.cfg.lora)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]

    # ---- the loop -----------------------------------------------------------------------------
    def _sub_loss(self, logits, labels, targets, teacher_logprob) -> tuple[torch.Tensor, float, float | None]:
        """(objective, CE value, KD value or None) of one sub-network on one micro-batch."""
        cfg = self.cfg
        alpha = cfg.distill_alpha
        if cfg.distill == "none" or (targets is None and teacher_logprob is None):
            ce = lm_loss(logits, labels)
            return ce, ce.item(), None
        ce = lm_loss(logits if alpha < 1 else logits.detach(), labels)  # alpha = 1: CE only logged
        student = logits[:, :-1] if alpha > 0 else logits[:, :-1].detach()
        supervised = labels[:, 1:] != IGNORE  # position t predicts token t + 1, as in lm_loss
        if targets is not None:
            top_idx, top_lp, tail = targets
            kd = kd_loss(student, top_idx[:, :-1], top_lp[:, :-1], tail[:, :-1], supervised, cfg.distill_temperature)
        else:
            kd = kd_loss_full(student, teacher_logprob[:, :-1], supervised, cfg.distill_temperature)
        return alpha * kd + (1 - alpha) * ce, ce.item(), kd.item()

    def train_step(self) -> dict:
        cfg, device = self.cfg, self.accelerator.device
        self.model.train()
        subs = self.sandwich()
        losses = {str(s): 0.0 for s in subs}
        kd_losses: dict[str, float] = {}
        inplace = cfg.distill == "logits" and cfg.teacher == "largest"
        if inplace and subs[0] != self.supernet.space.largest():
            raise NaspruneError("in-place distillation needs the largest sub-network first in the sandwich")
        tokens, state_teacher_seconds, state_losses = 0, 0.0, {}
        for micro in range(cfg.grad_accum):
            idx = batch_indices(
                self.step, micro, cfg, len(self.data), self.accelerator.num_processes, self.accelerator.process_index
            )
            batch = self.data.subset(torch.as_tensor(idx))
            ids, labels = batch.input_ids.to(device), batch.labels.to(device)
            mask = batch.attention_mask.to(device) if batch.kind == "instruct" else None
            tokens += int(batch.attention_mask.sum())
            targets = self.teacher_cache.fetch(idx, device) if self.teacher_cache is not None else None
            teacher_logprob, wanted = None, None
            if self._state_teacher is not None:
                start = time.perf_counter()
                with self.accelerator.autocast():
                    wanted = teacher_states(self._state_teacher.to(device), ids, mask, self._state_targets)
                state_teacher_seconds += time.perf_counter() - start
            for i, sub in enumerate(subs):
                self.supernet.select(sub)
                states = [] if wanted is not None else None
                with self.accelerator.autocast(), simulate(cfg.quantization or "fp32", self.supernet.model):
                    logits = self.model(ids, mask, states=states)
                loss, ce, kd = self._sub_loss(logits, labels, targets, teacher_logprob)
                if wanted is not None:
                    hidden = state_loss(states, wanted, batch.attention_mask.to(device).bool())
                    loss = loss + cfg.distill_states * hidden
                    state_losses[str(sub)] = state_losses.get(str(sub), 0.0) + hidden.item() / cfg.grad_accum
                    del states
                if inplace and i == 0:  # the largest: CE only, then it teaches the rest (detached)
                    teacher_logprob = inplace_targets(logits, cfg.distill_temperature)
                del logits
                self.accelerator.backward(loss / (len(subs) * cfg.grad_accum))
                losses[str(sub)] += ce / cfg.grad_accum
                if kd is not None:
                    kd_losses[str(sub)] = kd_losses.get(str(sub), 0.0) + kd / cfg.grad_accum
        if cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(
                [p for p in self.supernet.parameters() if p.requires_grad], cfg.max_grad_norm
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.supernet.select(self.supernet.space.largest())
        self.step += 1
        out = {"losses": losses, "tokens": tokens * len(subs)}
        if cfg.distill != "none":
            out["kd_losses"] = kd_losses
            out["teacher_seconds"] = self.teacher_cache.take_fetch_seconds() if self.teacher_cache else 0.0
            if self._state_teacher is not None:  # the live teacher of the state loss is teacher time too
                out["teacher_seconds"] += state_teacher_seconds
                out["state_losses"] = state_losses
        return out

    def run(self, progress: bool = True) -> dict:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cfg = self.cfg
        start, tokens_seen = time.perf_counter(), 0
        step_seconds, teacher_seconds = 0.0, 0.0
        stopped_by_time = False
        columns = [
            TextColumn("train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, disable=not progress or not self.accelerator.is_main_process) as bar:
            task = bar.add_task("train", total=cfg.steps, completed=self.step, loss=float("nan"), tps=0.0)
            while self.step < cfg.steps:
                if cfg.max_minutes is not None and time.perf_counter() - start > cfg.max_minutes * 60:
                    stopped_by_time = True
                    break
                t0 = time.perf_counter()
                out = self.train_step()
                dt = time.perf_counter() - t0
                tokens_seen += out["tokens"]
                mean_loss = float(np.mean(list(out["losses"].values())))
                bar.update(task, advance=1, loss=mean_loss, tps=out["tokens"] / dt)
                step_seconds += dt
                teacher_seconds += out.get("teacher_seconds", 0.0)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    record = {
                        "step": self.step,
                        "loss": mean_loss,
                        "losses": out["losses"],
                        "step_seconds": dt,
                        "tokens_per_s": out["tokens"] / dt,
                        "lr": self.scheduler.get_last_lr()[0],
                    }
                    if cfg.distill != "none":
                        record.update(
                            kd_losses=out["kd_losses"],
                            teacher_seconds=out["teacher_seconds"],
                            teacher_fraction=out["teacher_seconds"] / dt,
                        )
                        if "state_losses" in out:
                            record["state_losses"] = out["state_losses"]
                    self._log(record)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        self.save_checkpoint()
        elapsed = time.perf_counter() - start
        stats = {
            "steps": self.step,
            "seconds": elapsed,
            "tokens": tokens_seen,
            "stopped_by_time_budget": stopped_by_time,
            "processes": self.accelerator.num_processes,
        }
        if cfg.distill != "none":
            # teacher cost of the steps of this call: fetching cached targets (0 for in-place KD,
            # whose teacher forward is the largest sub-network's own); the one-off fill is separate
            stats["distill"] = {
                "teacher_fetch_seconds": teacher_seconds,
                "step_seconds": step_seconds,
                "teacher_fraction": teacher_seconds / step_seconds if step_seconds else 0.0,
                "teacher_fill": self.teacher_fill,
            }
        return stats

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def finished_model(self):
        """The trained HF model (LoRA merged) with the layout nasprune expects."""
        model = self.supernet.model
        return merge_lora(model) if self.cfg.lora else model


def student_kept_layers(student: LoadedModel, teacher: LoadedModel) -> list[int]:
    """The parent layers an extracted student kept (recorded by extraction); a student as deep as its
    teacher kept them all."""
    kept = (student.meta.subnetwork or {}).get("kept_layers")
    if kept is not None:
        return [int(i) for i in kept]
    depth, parent_depth = student.model.config.num_hidden_layers, teacher.model.config.num_hidden_layers
    if depth == parent_depth:
        return list(range(depth))
    raise NaspruneError(
        f"distill_states: {student.source} ({depth} layers) records no kept layers of its {parent_depth}-layer "
        "teacher; extract it with nasprune extract (or refine) so the layers can be matched"
    )


def prepare_model(loaded: LoadedModel, cfg: TrainConfig, calib: TokenizedData | None, log=print) -> LoadedModel:
    """Importance-* strategies need a permuted model: compute it here when MODEL has none."""
    needs_importance, _ = STRATEGIES[cfg.strategy]
    if not needs_importance or loaded.meta.importance is not None:
        return loaded
    from compressor.elastic.importance import compute_importance, layer_ranking, permute

    sn = loaded.supernet()
    log(
        f"{loaded.source} has no importance scores: computing them on {calib.source} "
        f"({int(calib.attention_mask.sum()):,} tokens)"
    )
    scores = compute_importance(sn, calib, calib.subset(slice(0, max(1, 8192 // calib.input_ids.shape[1]))))
    ranking = layer_ranking(scores)
    permute(sn, scores)
    meta = ModelMeta(
        search_space=loaded.meta.search_space,
        layer_ranking=ranking,
        importance={**scores.info, "layer_scores": [float(x) for x in scores.layers]},
        provenance=dict(loaded.meta.provenance),
    )
    return LoadedModel(loaded.model, loaded.tokenizer, meta, loaded.path, loaded.source)


def run_training(
    model: str,
    data: str,
    out: Path,
    cfg: TrainConfig,
    resume: bool = False,
    online: bool = False,
    calib_data: str | None = None,
    log=print,
    overwrite: bool = False,
    teacher_cache_dir: Path | None = None,
    teacher: str | LoadedModel | None = None,
) -> Path:
    """Train, checkpointing to ``OUT.train/``, then write the model dir ``OUT`` atomically.

    ``teacher``: a MODEL whose logits distil into ``model`` instead of ``model``'s own start weights
    (used by :mod:`compressor.recovery.refine`: the unpruned parent teaches an extracted sub-network).

    Ownership (:mod:`compressor.core.outputs`): ``OUT`` must be new, empty, or a nasprune model dir with
    ``overwrite``; ``OUT.train`` must be new, empty, or this command's own work dir (continued with
    ``resume``). A run that fails before its first checkpoint leaves no work dir behind.
    """
    from compressor.core.outputs import claim_output, mark_output

    out = Path(out)
    work = out.parent / f"{out.name}.train"
    if work.exists() and (work / "checkpoint.pt").exists() and not resume:
        raise NaspruneError(f"{work} holds an unfinished run; pass --resume to continue it or delete it to start over")
    overwrite = overwrite or resume  # a resumed run replaces its own time-budget output
    claim_output(out, "model", overwrite=overwrite)
    how = claim_output(work, "training", resume=True)
    if resume and how != "resume":
        raise NaspruneError(f"--resume: no checkpoint at {work / 'checkpoint.pt'}; run without --resume to start")
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    mark_output(work, "training")
    try:
        return _train_into(
            model, data, out, work, cfg, resume, online, calib_data, log, overwrite, teacher_cache_dir, teacher
        )
    except BaseException:
        if created and not (work / "checkpoint.pt").exists():
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming: leave nothing half-made
        raise


def _train_into(
    model: str,
    data: str,
    out: Path,
    work: Path,
    cfg: TrainConfig,
    resume: bool,
    online: bool,
    calib_data: str | None,
    log,
    overwrite: bool,
    teacher_cache_dir: Path | None = None,
    teacher: str | LoadedModel | None = None,
) -> Path:
    torch.manual_seed(cfg.seed)
    loaded = load_model(model, online=online)
    train_data = load_data(loaded.tokenizer, data, cfg.seq_len, cfg.max_train_tokens, online, cfg.prompt_format)
    calib = None
    if STRATEGIES[cfg.strategy][0] and loaded.meta.importance is None:
        calib = load_data(loaded.tokenizer, calib_data or data, 512, 65536, online, cfg.prompt_format)
    loaded = prepare_model(loaded, cfg, calib, log)
    # a caller that already holds the teacher (refine: it repaired against it) passes it instead of a path
    teacher_loaded = teacher
    if teacher is not None and not isinstance(teacher, LoadedModel):
        teacher_loaded = load_model(teacher, online=online)
    if teacher_loaded is not None and teacher_loaded.model.config.vocab_size != loaded.model.config.vocab_size:
        raise NaspruneError(
            f"teacher {teacher} has another vocabulary than {model}; distillation needs the same tokenizer"
        )
    trainer = Trainer(
        loaded, train_data, cfg, work, teacher_cache_dir=teacher_cache_dir, log=log, teacher=teacher_loaded
    )
    del teacher_loaded
    if resume:
        trainer.load_checkpoint()
        log(f"resumed at step {trainer.step}")
    stats = trainer.run()
    model_out = trainer.finished_model()
    meta = ModelMeta(
        search_space=loaded.meta.search_space,
        layer_ranking=loaded.meta.layer_ranking,
        importance=loaded.meta.importance,
        provenance={
            **loaded.meta.provenance,
            "versions": versions(),
            "training": {
                "config": asdict(cfg),
                "data": str(data),
                **stats,
                "lora_targets": trainer.lora_targets,
                "train_tokens_available": int(train_data.attention_mask.sum()),
            },
        },
    )
    meta.provenance.pop("created_at", None)
    log_src = trainer.log_path

    def copy_log(tmp):
        if log_src.exists():
            shutil.copy(log_src, tmp / "train_log.jsonl")

    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        save_model_dir(model_out, loaded.tokenizer, meta, out, extra=copy_log, overwrite=overwrite)
        if not stats["stopped_by_time_budget"]:
            trainer.ckpt_path.unlink(missing_ok=True)
    return out
