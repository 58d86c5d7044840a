"""Recovery commands: train, refine, distill-blocks, block-scores (registered by :func:`compressor.cli.register`).

The option defaults of ``refine`` and ``distill-blocks`` are read from the algorithms' configs
(:class:`~compressor.recovery.refine.RefineConfig`, :class:`~compressor.recovery.bld.BlockDistillConfig`),
the one definition ``nasprune compress``'s YAML sections load into too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from compressor.core.console import STATE, console, quiet_transformers
from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output
from compressor.elastic.modeldir import load_for_cli
from compressor.recovery.bld import BlockDistillConfig
from compressor.recovery.refine import RefineConfig

_REFINE = RefineConfig()
_BLOCKS = BlockDistillConfig()
_MODEL_HELP = "dir, .gguf, hub id (--online) or 'default'"
_TEACHER_HELP = (
    "original = the unpruned (permuted) model at the start, frozen, its top-k logits cached on disk once | "
    "largest = in-place, the same step's largest sub-network (detached)"
)
_TEACHER_CACHE_HELP = (
    "where teacher targets are cached (default $NASPRUNE_CACHE/teacher); "
    "reused by any run on the same tokens and teacher"
)
_STRATEGIES = "standard | random | grid-params | importance-random | importance-grid-params | importance-calibrate-mag"


def train(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    data: str = typer.Option(
        ..., "--data", help="training text (.txt) or Alpaca .jsonl (or a hub dataset with --online)"
    ),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (LoRA merged) + training log"),
    strategy: str = typer.Option("importance-calibrate-mag", help=_STRATEGIES),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file with TrainConfig fields (flags override it)"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps"),
    max_minutes: Optional[float] = typer.Option(None, help="stop after this much training time (resumable)"),
    batch_size: Optional[int] = typer.Option(None),
    grad_accum: Optional[int] = typer.Option(None),
    seq_len: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    lora: bool = typer.Option(False, "--lora", help="LoRA on every linear instead of full fine-tuning"),
    lora_r: Optional[int] = typer.Option(None),
    lora_alpha: Optional[float] = typer.Option(None),
    untie_lm_head: bool = typer.Option(
        False, "--untie-lm-head", help="give lm_head its own weights so LoRA can adapt it"
    ),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    calib_data: Optional[str] = typer.Option(
        None,
        help="calibration data for importance-* strategies on a model without importance (default: the training data)",
    ),
    seed: Optional[int] = typer.Option(None),
    checkpoint_every: Optional[int] = typer.Option(
        None, "--checkpoint-every", help="optimizer steps between checkpoints"
    ),
    distill: Optional[str] = typer.Option(
        None,
        "--distill",
        help="none | logits: add logit distillation (KD) against a teacher to every sub-network's loss (default none)",
    ),
    teacher: Optional[str] = typer.Option(None, "--teacher", help=_TEACHER_HELP),
    distill_alpha: Optional[float] = typer.Option(
        None, "--distill-alpha", help="loss = alpha*KD + (1-alpha)*CE (default 1: pure KD)"
    ),
    distill_topk: Optional[int] = typer.Option(
        None, "--distill-topk", help="teacher tokens cached per position, plus one tail bucket (default 64)"
    ),
    distill_temperature: Optional[float] = typer.Option(
        None,
        "--distill-temperature",
        help="softmax temperature of teacher and student; KD is scaled by T^2 (default 1)",
    ),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help=_TEACHER_CACHE_HELP),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT's checkpoint exactly"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
):
    """Fine-tune the super-network with the sandwich rule (full or LoRA).

    Example: nasprune train runs/imp --data builtin:northanger_abbey --out runs/supernet --steps 200
    """
    from compressor.core.yamlconfig import read_yaml_mapping
    from compressor.recovery.train import TrainConfig, run_training

    given = dict(locals())
    flags = {k: v for k, v in given.items() if k in _TRAIN_FLAGS}
    if config is not None:
        read_yaml_mapping(config)  # a missing or broken file is one line (TrainConfig.load reads it again)
    cfg = TrainConfig.load(config, _train_overrides(flags))
    path = run_training(
        model,
        data,
        out,
        cfg,
        resume=resume,
        online=STATE["online"],
        calib_data=calib_data,
        overwrite=overwrite,
        teacher_cache_dir=teacher_cache,
    )
    console.print(f"wrote {path}")


_TRAIN_FLAGS = (
    "strategy steps max_minutes batch_size grad_accum seq_len lr lora lora_r lora_alpha untie_lm_head "
    "gradient_checkpointing seed checkpoint_every distill teacher distill_alpha distill_topk distill_temperature"
).split()


def _train_overrides(flags: dict) -> dict:
    """The TrainConfig fields the ``train`` flags set (they override ``--config``): an unset option
    (None), or an off switch (``--lora`` absent), leaves the file's value."""
    switches = ("lora", "untie_lm_head", "gradient_checkpointing")
    flags = {k: (v or None) if k in switches else v for k, v in flags.items()}
    return {k: v for k, v in flags.items() if v is not None}


def refine(
    model: str = typer.Argument(..., help="the parent: an importance-permuted or trained super-network (model dir)"),
    arch: str = typer.Option(..., "--arch", help="the sub-network to refine: JSON object or a file"),
    data: str = typer.Option(
        ..., "--data", help="distillation data (.txt or Alpaca .jsonl); also the repair calibration"
    ),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (plain HF checkpoint of the refined model)"),
    minutes: float = typer.Option(_REFINE.minutes, "--minutes", help="training-time budget"),
    steps: int = typer.Option(
        _REFINE.steps, "--steps", help="step budget (the run stops at the first of minutes / steps)"
    ),
    validation: Optional[str] = typer.Option(
        None, "--validation", help="plain text for quality before/after (never the --data text)"
    ),
    no_repair: bool = typer.Option(
        not _REFINE.repair, "--no-repair", help="skip the closed-form repair before training"
    ),
    teacher: Optional[str] = typer.Option(
        None,
        "--teacher",
        help="the model to distil from (default: MODEL's largest sub-network); e.g. the importance-permuted "
        "original when MODEL is a trained super-network",
    ),
    batch_size: int = typer.Option(_REFINE.batch_size, help="windows per step"),
    seq_len: int = typer.Option(_REFINE.seq_len, help="tokens per window"),
    lr: float = typer.Option(_REFINE.lr),
    distill_alpha: float = typer.Option(
        _REFINE.distill_alpha,
        "--distill-alpha",
        help="alpha x KD + (1 - alpha) x cross-entropy; 0: cross-entropy only, no teacher",
    ),
    distill_states: float = typer.Option(
        _REFINE.distill_states,
        "--distill-states",
        help="weight of intermediate-state distillation (the student's residual stream follows the parent's, "
        "block by block; runs the parent's blocks every step); 0: logits only",
    ),
    block_steps: int = typer.Option(
        _REFINE.block_steps,
        "--block-steps",
        help="block-local distillation of the repaired sub-network first: steps per block on teacher-forced "
        "windows (its time comes out of --minutes); 0: off",
    ),
    quantization: Optional[str] = typer.Option(
        _REFINE.quantization,
        "--quantization",
        help="quantization-aware refine: train with this dynamic or weight-only recipe of the engine simulated "
        "(e.g. int8-pc, int8-mixed), for a model that will ship at that precision; default: float training",
    ),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted refine of the same --out"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
):
    """Distil one sub-network on its own from the unpruned original (repair first), for a short budget.

    Example: nasprune refine runs/demo/supernet --arch arch.json --data train.txt --out runs/r --minutes 3
    """
    from compressor.elastic.search_space import SubNetwork
    from compressor.recovery.refine import refine as run_refine

    quiet_transformers()
    sub = SubNetwork.parse(arch)
    cfg = RefineConfig(
        minutes=minutes,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        repair=not no_repair,
        distill_alpha=distill_alpha,
        distill_states=distill_states,
        block_steps=block_steps,
        quantization=quantization,
    )
    _warn_if_saturates(quantization)
    kw = dict(validation=validation, online=STATE["online"], resume=resume, overwrite=overwrite, teacher=teacher)
    record = run_refine(model, sub, data, out, cfg, log=console.print, **kw)
    _print_refined(record, out, sub)


def _warn_if_saturates(quantization: Optional[str]) -> None:
    if quantization is not None:
        from compressor.quant.quantize import saturation_risk

        risk = saturation_risk(quantization)  # the weights train for the recipe; this host's engine mangles it
        if risk:
            console.print(f"[yellow]warning:[/] {risk}")


def _print_refined(record: dict, out: Path, sub) -> None:
    shown = ", ".join(
        f"{k.removeprefix('ppl_')} {record[k]:.2f}"
        for k in ("ppl_one_shot", "ppl_repaired", "ppl_blocks", "ppl_refined", "ppl_refined_quantized")
        if record.get(k) is not None
    )
    console.print(
        f"wrote {out}: {sub}, {record['training']['steps']} steps in {record['training']['seconds']:.0f}s"
        + (f"; validation perplexity {shown}" if shown else "")
    )


def distill_blocks(
    model: str = typer.Argument(..., help="the importance-permuted super-network (model dir)"),
    data: str = typer.Option(
        ..., "--data", help="calibration text (.txt or Alpaca .jsonl) for the teacher activations"
    ),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (same shapes, every block trained)"),
    steps: int = typer.Option(_BLOCKS.steps, "--steps", help="optimizer steps per block"),
    processes: int = typer.Option(
        _BLOCKS.processes, "--processes", help="processes the blocks are split over (no communication)"
    ),
    tokens: int = typer.Option(
        _BLOCKS.tokens, "--tokens", help="calibration tokens whose teacher activations are cached"
    ),
    batch_size: int = typer.Option(_BLOCKS.batch_size, help="windows per step"),
    seq_len: int = typer.Option(_BLOCKS.seq_len, help="tokens per window"),
    lr: float = typer.Option(_BLOCKS.lr),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
):
    """Block-local distillation: every width of every block learns the original block's output.

    Example: nasprune distill-blocks runs/demo/importance --data builtin:northanger_abbey --out runs/bld --steps 100
    """
    from compressor.recovery.bld import distill_blocks_to

    cfg = BlockDistillConfig(
        steps=steps, batch_size=batch_size, seq_len=seq_len, tokens=tokens, lr=lr, processes=processes
    )
    path, report = distill_blocks_to(
        model, data, out, cfg, online=STATE["online"], log=console.print, overwrite=overwrite
    )
    worst = max(report["blocks"], key=lambda r: r["loss_last"])
    console.print(
        f"wrote {path}: {len(report['blocks'])} blocks x {steps} steps in {report['seconds']:.0f}s "
        f"({processes} process(es)); worst block {worst['layer']}: loss {worst['loss_first']:.4f} -> "
        f"{worst['loss_last']:.4f}"
    )


def _widths(flag: str, text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise NaspruneError(f"{flag} must be comma-separated widths like 3,6 (got {text})") from None
    if not values:
        raise NaspruneError(f"{flag} names no width")
    return values


def block_scores(
    model: str = typer.Argument(..., help="an importance-permuted (or BLD-trained) super-network (model dir)"),
    data: str = typer.Option(
        ..., "--data", help="validation text (.txt or Alpaca .jsonl): never the calibration/training text"
    ),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (same weights + block_scores)"),
    tokens: int = typer.Option(2048, "--tokens", help="validation tokens every variant is scored on"),
    seq_len: int = typer.Option(128, "--seq-len"),
    choices: int = typer.Option(3, "--choices", help="widths scored per dimension (spread over the space)"),
    heads: Optional[str] = typer.Option(None, "--heads", help="explicit head widths, e.g. 3,6 (whole KV groups)"),
    ffn: Optional[str] = typer.Option(None, "--ffn", help="explicit FFN widths, e.g. 512,1024"),
    embed: Optional[str] = typer.Option(None, "--embed", help="explicit embedding widths (whole-network scores)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
):
    """Puzzle's "replace one block" scores: validation-loss change per block per width, stored in nasprune.json.

    Example: nasprune block-scores runs/demo/importance --data builtin:sense_and_sensibility_validation --out runs/bs
    """
    from dataclasses import asdict as _asdict

    from compressor.core.data import calibration_text
    from compressor.elastic.evaluate import token_windows
    from compressor.elastic.modeldir import ModelMeta, save_model_dir
    from compressor.recovery.block_scores import BlockScoreConfig, compute_block_scores, scored_widths

    cfg = BlockScoreConfig(
        tokens=tokens,
        seq_len=seq_len,
        choices=choices,
        num_heads=_widths("--heads", heads),
        ffn_dim=_widths("--ffn", ffn),
        embed_dim=_widths("--embed", embed),
        batch_size=batch_size,
    )
    claim_output(out, "model", overwrite=overwrite)
    loaded = load_for_cli(model)
    sn = loaded.supernet()
    scored_widths(sn.space, cfg)  # bad widths: one line before the long pass
    if loaded.tokenizer is None:
        raise NaspruneError(f"{model} has no tokenizer; block scores need one to read --data")
    windows = token_windows(loaded.tokenizer, calibration_text(data, STATE["online"]), seq_len, tokens)
    with console.status(f"scoring {len(sn.family.layers(sn.model))} blocks on {windows.numel():,} tokens ..."):
        scores = compute_block_scores(sn, windows, cfg)
    scores["data"] = data
    meta = ModelMeta(**{**_asdict(loaded.meta), "block_scores": scores})
    meta.provenance.pop("created_at", None)
    path = save_model_dir(loaded.model, loaded.tokenizer, meta, out, overwrite=overwrite)
    table = Table(title=f"loss change per block (base loss {scores['base_loss']:.4f})")
    table.add_column("width")
    table.add_column("mean")
    table.add_column("most sensitive blocks")
    for dim in ("num_heads", "ffn_dim"):
        for w, per_layer in scores["delta"][dim].items():
            worst = sorted(range(len(per_layer)), key=lambda i: -per_layer[i])[:3]
            table.add_row(
                f"{dim}={w}",
                f"{sum(per_layer) / len(per_layer):+.4f}",
                ", ".join(f"{i} ({per_layer[i]:+.3f})" for i in worst),
            )
    for w, d in scores["delta"]["embed_dim"].items():
        table.add_row(f"embed_dim={w}", f"{d:+.4f}", "(whole network)")
    console.print(table)
    console.print(f"wrote {path} ({scores['seconds']:.0f}s)")
