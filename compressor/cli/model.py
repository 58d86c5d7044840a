"""Model commands: info, extract, importance, eval (registered by :func:`compressor.cli.register`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from compressor.core.console import STATE, console
from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output
from compressor.elastic.modeldir import load_for_cli


def info(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Architecture, search-space choices, number of sub-networks, min/max parameters.

    Example: nasprune info default --json
    """
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
    """Extract one sub-network as a standalone smaller model that plain transformers loads.

    Example: nasprune extract runs/demo/supernet --arch arch.json --out runs/sub
    """
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
    """Score heads, neurons, channels and layers; permute so 'first k' = 'most important k'.

    Example: nasprune importance default --data builtin:northanger_abbey --out runs/imp
    """
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
    """Perplexity (through the super-network and the extracted model) and lm-eval accuracy of a sub-network.

    Example: nasprune eval runs/demo/supernet --data builtin:sense_and_sensibility_validation
    """
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
