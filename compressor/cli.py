"""CLI commands of the compressor stages: info, extract, importance, train, eval.

``register(app)`` adds them to the one ``nasprune`` app (assembled in ``nasprune.cli``); the
shared console, ``--online`` state and one-line error handler come from ``compressor.core.console``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from compressor.core.console import STATE, console, handles_errors, quiet_transformers
from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output
from compressor.elastic.modeldir import load_for_cli


def register(app: typer.Typer) -> None:
    app.command("info")(handles_errors(info))
    app.command("extract")(handles_errors(extract))
    app.command("importance")(handles_errors(importance))
    app.command("train")(handles_errors(train))
    app.command("eval")(handles_errors(evaluate))
    app.command("refine")(handles_errors(refine))
    app.command("distill-blocks")(handles_errors(distill_blocks))
    app.command("block-scores")(handles_errors(block_scores))


def info(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Architecture, search-space choices, number of sub-networks, min/max parameters."""
    loaded = load_for_cli(model)
    sn = loaded.supernet()
    space, dims = sn.space, sn.family.dims
    smallest, largest = space.smallest(), space.largest()
    data = {
        "model": model,
        "path": str(loaded.path) if loaded.path else None,
        "architecture": (loaded.model.config.architectures or [type(loaded.model).__name__])[0],
        "family": sn.family.name,
        "dims": dims.__dict__,
        "gqa": {"query_heads_per_kv_group": dims.q_per_group, "kv_groups": dims.num_kv_heads},
        "elastic_dimensions": sn.family.elastic_dimensions(),
        "attention": {
            "layer_types": sn.family.layer_types,
            "sliding_window": getattr(loaded.model.config, "sliding_window", None),
            "pattern": sn.family.attention_pattern(),
            "smallest_pattern": sn.family.attention_pattern(space.kept_layers(smallest)),
        },
        "search_space": space.to_dict(),
        "layer_ranking": space.layer_ranking,
        "importance_permuted": loaded.meta.importance is not None,
        "params": {
            "min": space.num_params(smallest),
            "max": space.num_params(largest),
            "smallest": smallest.to_dict(),
            "largest": largest.to_dict(),
        },
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(f"[bold]{data['architecture']}[/] ({sn.family.name}) from {data['path'] or model}")
    console.print(
        f"  vocab {dims.vocab_size}, hidden {dims.hidden_size}, {dims.num_layers} layers, "
        f"FFN {dims.intermediate_size}, "
        f"{dims.num_heads} query heads in {dims.num_kv_heads} KV groups (head_dim {dims.head_dim}), "
        f"tied embeddings: {dims.tied_embeddings}"
    )
    table = Table(title="search space")
    table.add_column("dimension")
    table.add_column("choices")
    for dim, values in space.choices.items():
        shown = ", ".join(map(str, values))
        if dim == "num_heads":
            shown += f"   (KV heads: {', '.join(str(h // dims.q_per_group) for h in values)})"
        table.add_row(dim, shown)
    console.print(table)
    console.print(f"  sub-networks: {space.size:,}   params: {data['params']['min']:,} .. {data['params']['max']:,}")
    console.print(f"  layer ranking: {'importance' if loaded.meta.layer_ranking else 'identity (no importance yet)'}")
    att = data["attention"]
    console.print(f"  attention: {att['pattern']}   (smallest sub-network: {att['smallest_pattern']})")
    console.print("  elastic dimensions:")
    for line in data["elastic_dimensions"]:
        console.print(f"    {line}")
    for note in space.notes:
        console.print(f"  note: {note}")


def extract(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    arch: str = typer.Option(
        ..., "--arch", help='JSON object {"embed_dim":..,"num_heads":..,"ffn_dim":..,"num_layers":..} or a file'
    ),
    out: Path = typer.Option(..., "--out", help="Output nasprune model dir (plain HF checkpoint + nasprune.json)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
    repair: Optional[str] = typer.Option(
        None,
        "--repair",
        metavar="DATA",
        help="closed-form repair (bias compensation + ridge refit) on this calibration data (.txt or Alpaca .jsonl)",
    ),
    repair_tokens: int = typer.Option(4096, help="calibration tokens for --repair"),
):
    """Extract one sub-network as a standalone smaller model that plain transformers loads."""
    from compressor.elastic.extract import save_extracted
    from compressor.elastic.search_space import SubNetwork

    sub = SubNetwork.parse(arch)
    claim_output(out, "model", overwrite=overwrite)
    loaded = load_for_cli(model)
    sn = loaded.supernet()
    sn.space.validate(sub)
    repaired, report = None, None
    if repair:
        from compressor.recovery.repair import RepairConfig, calibration_windows, repair_model

        cfg = RepairConfig(tokens=repair_tokens)
        windows = calibration_windows(loaded.tokenizer, repair, cfg, STATE["online"])
        with console.status(f"repairing {sub} on {windows.numel():,} tokens ..."):
            repaired, rep = repair_model(loaded, sub, windows, cfg, log=console.print)
        report = {"data": repair, **rep.summary()}
    with console.status(f"extracting {sub} ..."):
        path, n = save_extracted(loaded, sn, sub, out, overwrite=overwrite, model=repaired, repair=report)
    console.print(
        f"wrote {path}: {sub} ({sn.space.num_kv_heads(sub)} KV heads), {n:,} params "
        f"({n / sn.space.num_params(sn.space.largest()):.1%} of the super-network)"
    )


def importance(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    data: str = typer.Option(
        ..., "--data", help="calibration text (.txt), Alpaca .jsonl, or a hub dataset with --online"
    ),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (permuted weights + layer ranking)"),
    tokens: int = typer.Option(65536, help="calibration tokens for head/neuron/channel scores"),
    layer_tokens: int = typer.Option(2048, help="tokens for the layer metric (drop-loss runs one pass per layer)"),
    layer_metric: str = typer.Option("drop-loss", help="drop-loss | block-influence"),
    seq_len: int = typer.Option(512, help="tokens per calibration window"),
    batch_size: int = typer.Option(8),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
):
    """Score heads, neurons, channels and layers; permute so 'first k' = 'most important k'."""
    from compressor.core.data import load_data
    from compressor.elastic.importance import LAYER_METRICS, compute_importance, layer_ranking, permute
    from compressor.elastic.importance_io import save_importance

    if layer_metric not in LAYER_METRICS:
        raise NaspruneError(f"unknown --layer-metric '{layer_metric}'; choose {' or '.join(LAYER_METRICS)}")
    claim_output(out, "model", overwrite=overwrite)
    loaded = load_for_cli(model)
    calib = load_data(loaded.tokenizer, data, seq_len, tokens, STATE["online"])
    layer_data = calib.subset(slice(0, max(1, layer_tokens // seq_len)))
    sn = loaded.supernet()
    scores = compute_importance(sn, calib, layer_data, layer_metric, batch_size)
    ranking = layer_ranking(scores)
    sorted_scores = permute(sn, scores)
    path = save_importance(loaded, sorted_scores, ranking, out, overwrite=overwrite)
    info = scores.info
    console.print(
        f"scored {info['calibration_tokens']:,} tokens in {info['seconds_activation']:.1f}s "
        f"(+ layer {layer_metric} on {info['layer_tokens']:,} tokens, total {info['seconds_total']:.1f}s)"
    )
    console.print(f"layer ranking (most important first): {ranking}")
    console.print(f"wrote {path}; use it as MODEL everywhere (e.g. nasprune extract {path} --arch ...)")


def train(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    data: str = typer.Option(
        ..., "--data", help="training text (.txt) or Alpaca .jsonl (or a hub dataset with --online)"
    ),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (LoRA merged) + training log"),
    strategy: str = typer.Option(
        "importance-calibrate-mag",
        help="standard | random | grid-params | importance-random | importance-grid-params | importance-calibrate-mag",
    ),
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
    teacher: Optional[str] = typer.Option(
        None,
        "--teacher",
        help="original = the unpruned (permuted) model at the start, "
        "frozen, its top-k logits cached on disk once | largest = in-place, the same "
        "step's largest sub-network (detached)",
    ),
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
    teacher_cache: Optional[Path] = typer.Option(
        None,
        "--teacher-cache",
        help="where teacher targets are cached "
        "(default $NASPRUNE_CACHE/teacher); reused by any run on the same "
        "tokens and teacher",
    ),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT's checkpoint exactly"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
):
    """Fine-tune the super-network with the sandwich rule (full or LoRA)."""
    from compressor.core.yamlconfig import read_yaml_mapping
    from compressor.recovery.train import TrainConfig, run_training

    if config is not None:
        read_yaml_mapping(config)  # a missing or broken file is one line (TrainConfig.load reads it again)
    overrides = {
        k: v
        for k, v in dict(
            strategy=strategy,
            steps=steps,
            max_minutes=max_minutes,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seq_len=seq_len,
            lr=lr,
            lora=lora or None,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            untie_lm_head=untie_lm_head or None,
            gradient_checkpointing=gradient_checkpointing or None,
            seed=seed,
            checkpoint_every=checkpoint_every,
            distill=distill,
            teacher=teacher,
            distill_alpha=distill_alpha,
            distill_topk=distill_topk,
            distill_temperature=distill_temperature,
        ).items()
        if v is not None
    }
    cfg = TrainConfig.load(config, overrides)
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


def evaluate(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    arch: Optional[str] = typer.Option(None, "--arch", help="sub-network JSON or file (default: the largest)"),
    data: Optional[str] = typer.Option(None, "--data", help="held-out text for perplexity"),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="comma-separated lm-eval task names (standard ones need --online)"
    ),
    task_file: Optional[List[Path]] = typer.Option(
        None, "--task-file", help="local multiple-choice .jsonl task (repeatable)"
    ),
    include_path: Optional[Path] = typer.Option(None, help="directory of lm-eval YAML task files"),
    limit: Optional[int] = typer.Option(None, help="examples per lm-eval task"),
    seq_len: int = typer.Option(512),
    max_tokens: int = typer.Option(32768, help="held-out tokens for perplexity"),
    via: str = typer.Option("both", help="supernet | extracted | both (perplexity path)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Perplexity (through the super-network and the extracted model) and lm-eval accuracy of a sub-network."""
    from compressor.elastic.evaluate import evaluate_subnetwork
    from compressor.elastic.search_space import SubNetwork

    loaded = load_for_cli(model)
    sub = SubNetwork.parse(arch) if arch else None
    result = evaluate_subnetwork(
        loaded,
        sub,
        data=data,
        tasks=tasks,
        task_files=task_file,
        include_path=include_path,
        limit=limit,
        seq_len=seq_len,
        max_tokens=max_tokens,
        via=via,
        online=STATE["online"],
    )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"sub-network {result['arch']} ({result['params']:,} params)")
    for key in ("ppl_supernet", "ppl_extracted"):
        if key in result:
            console.print(f"  {key}: {result[key]:.3f}")
    for task, metrics in result.get("tasks", {}).items():
        console.print(f"  {task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def refine(
    model: str = typer.Argument(..., help="the parent: an importance-permuted or trained super-network (model dir)"),
    arch: str = typer.Option(..., "--arch", help="the sub-network to refine: JSON object or a file"),
    data: str = typer.Option(
        ..., "--data", help="distillation data (.txt or Alpaca .jsonl); also the repair calibration"
    ),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (plain HF checkpoint of the refined model)"),
    minutes: float = typer.Option(5.0, "--minutes", help="training-time budget"),
    steps: int = typer.Option(100_000, "--steps", help="step budget (the run stops at the first of minutes / steps)"),
    validation: Optional[str] = typer.Option(
        None, "--validation", help="plain text for quality before/after (never the --data text)"
    ),
    no_repair: bool = typer.Option(False, "--no-repair", help="skip the closed-form repair before training"),
    teacher: Optional[str] = typer.Option(
        None,
        "--teacher",
        help="the model to distil from (default: MODEL's largest "
        "sub-network); e.g. the importance-permuted original when MODEL is a trained "
        "super-network",
    ),
    batch_size: int = typer.Option(4, help="windows per step"),
    seq_len: int = typer.Option(256, help="tokens per window"),
    lr: float = typer.Option(1e-4),
    distill_alpha: float = typer.Option(
        1.0, "--distill-alpha", help="alpha x KD + (1 - alpha) x cross-entropy; 0: cross-entropy only, no teacher"
    ),
    distill_states: float = typer.Option(
        0.0,
        "--distill-states",
        help="weight of intermediate-state distillation (the student's residual stream follows the parent's, "
        "block by block; runs the parent's blocks every step); 0: logits only",
    ),
    block_steps: int = typer.Option(
        0,
        "--block-steps",
        help="block-local distillation of the repaired sub-network first: steps per block on teacher-forced "
        "windows (its time comes out of --minutes); 0: off",
    ),
    quantization: Optional[str] = typer.Option(
        None,
        "--quantization",
        help="quantization-aware refine: train with this dynamic or weight-only recipe of the engine simulated "
        "(e.g. int8-pc, int8-mixed), for a model that will ship at that precision; default: float training",
    ),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted refine of the same --out"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
):
    """Distil one sub-network on its own from the unpruned original (repair first), for a short budget."""
    from compressor.elastic.search_space import SubNetwork
    from compressor.recovery.refine import RefineConfig
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
    if quantization is not None:
        from compressor.quant.quantize import saturation_risk

        risk = saturation_risk(quantization)  # the weights train for the recipe; this host's engine mangles it
        if risk:
            console.print(f"[yellow]warning:[/] {risk}")
    record = run_refine(
        model,
        sub,
        data,
        out,
        cfg,
        validation=validation,
        online=STATE["online"],
        resume=resume,
        overwrite=overwrite,
        log=console.print,
        teacher=teacher,
    )
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
    steps: int = typer.Option(100, "--steps", help="optimizer steps per block"),
    processes: int = typer.Option(1, "--processes", help="processes the blocks are split over (no communication)"),
    tokens: int = typer.Option(8192, "--tokens", help="calibration tokens whose teacher activations are cached"),
    batch_size: int = typer.Option(4, help="windows per step"),
    seq_len: int = typer.Option(256, help="tokens per window"),
    lr: float = typer.Option(1e-4),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune model dir at --out"),
):
    """Block-local distillation: every width of every block learns the original block's output."""
    from compressor.recovery.bld import BlockDistillConfig, distill_blocks_to

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
    """Puzzle's "replace one block" scores: validation-loss change per block per width, stored in nasprune.json."""
    from dataclasses import asdict as _asdict

    from compressor.elastic.evaluate import token_windows
    from compressor.elastic.modeldir import ModelMeta, save_model_dir
    from compressor.recovery.block_scores import BlockScoreConfig, compute_block_scores, scored_widths
    from compressor.recovery.repair import calibration_text

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
