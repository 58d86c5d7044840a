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

Where the pieces are: this module is the entry point (:func:`run_training`: claim the outputs, load,
train, write the model dir); the settings and step plan are :mod:`compressor.recovery.train_config`,
the loop and its checkpoints :mod:`compressor.recovery.trainer`, the LoRA surgery
:mod:`compressor.recovery.lora`.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from compressor.core.data import TokenizedData, load_data
from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import LoadedModel, ModelMeta, load_model, save_model_dir, versions
from compressor.recovery.train_config import STRATEGIES, TrainConfig
from compressor.recovery.trainer import Trainer

# The training API callers import from here (the config and its helpers live in train_config).
__all__ = [
    "STRATEGIES",
    "TrainConfig",
    "Trainer",
    "prepare_model",
    "run_training",
]


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
