"""The training loop: one super-network run, its teachers, optimizer and exact checkpoints.

:class:`Trainer` builds everything a run needs from a loaded model and a :class:`TrainConfig`
(teachers and the teacher cache, the super-network with LoRA or full fine-tuning, accelerate,
optimizer, schedule and sampler), then steps the sandwich and checkpoints. How a run is set up
and written out as a model dir is :mod:`compressor.recovery.train`; the settings are
:mod:`compressor.recovery.train_config`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compressor.core.data import IGNORE, TokenizedData
from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import LoadedModel, cache_dir
from compressor.elastic.quant_sim import simulate
from compressor.elastic.search_space import SubNetwork
from compressor.elastic.supernet import SuperNetwork
from compressor.recovery.distill import TeacherCache, inplace_targets, kd_loss, kd_loss_full, state_dict_hash
from compressor.recovery.distill_states import state_loss, teacher_layer_targets, teacher_states
from compressor.recovery.lora import add_lora, lora_state, merge_lora, untie_lm_head
from compressor.recovery.sampling import make_sampler
from compressor.recovery.train_config import (
    STRATEGIES,
    TrainConfig,
    batch_indices,
    resolve_mixed_precision,
    windows_needed,
)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def warmup_cosine(warm: int, total: int, floor: float):
    """The learning-rate factor of a step: linear warmup over ``warm`` steps, then cosine down to ``floor``."""

    def schedule(step):
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


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
        self.loaded, self.data, self.cfg, self.work_dir = loaded, data, cfg, Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cached_teacher = cfg.distill == "logits" and cfg.teacher == "original"
        teacher_hash = self._init_teachers(teacher, cached_teacher)
        self._init_model()
        self._init_optimization()
        self.step = 0
        self.log_path = self.work_dir / "train_log.jsonl"
        self.ckpt_path = self.work_dir / "checkpoint.pt"
        self.teacher_cache: TeacherCache | None = None
        self.teacher_fill: dict | None = None
        if cached_teacher:
            self._init_teacher_cache(teacher_hash, teacher_cache_dir, log)
        self._external_teacher = None  # its targets are on disk now: free it (the state loss keeps its own)

    # ---- setup (in this order: the teachers see the model as loaded) ------------------------------
    def _init_teachers(self, teacher: LoadedModel | None, cached_teacher: bool) -> str | None:
        """The external and state teachers; returns the cached teacher's weight hash (None: no cache)."""
        cfg, model = self.cfg, self.loaded.model
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
                student_kept_layers(self.loaded, teacher), teacher.model.config.num_hidden_layers
            )
        return state_dict_hash(teacher.model if teacher is not None else model) if cached_teacher else None

    def _init_model(self) -> None:
        """The super-network over the loaded model, with its trainable parameters (LoRA or all)."""
        cfg, loaded = self.cfg, self.loaded
        model = loaded.model
        if cfg.untie_lm_head:
            untie_lm_head(model)
        self.supernet = SuperNetwork(model, loaded.meta.space_config, loaded.meta.layer_ranking)
        self.supernet.gradient_checkpointing = cfg.gradient_checkpointing
        self.lora_targets = add_lora(model, cfg) if cfg.lora else []
        if not cfg.lora:
            for p in model.parameters():
                p.requires_grad_(True)

    def _init_optimization(self) -> None:
        """accelerate, AdamW with warmup + cosine, and the sandwich's sampler."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        cuda = torch.cuda.is_available()
        precision = resolve_mixed_precision(cfg)
        self.accelerator = Accelerator(
            mixed_precision=precision,
            cpu=not cuda,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        params = [p for p in self.supernet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
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

    def _init_teacher_cache(self, teacher_hash: str, teacher_cache_dir: Path | None, log) -> None:
        """The original teacher's top-k targets on disk, filled now for every window the run will read."""
        cfg, data, acc = self.cfg, self.data, self.accelerator
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
