"""CLI commands of the compressor stages: importance, train, eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from compressor.cli import STATE, _load, console, handles_errors


def register(app: typer.Typer) -> None:
    app.command("importance")(handles_errors(importance))
    app.command("train")(handles_errors(train))
    app.command("eval")(handles_errors(evaluate))
    app.command("search")(handles_errors(search))
    app.command("compress")(handles_errors(compress))


def importance(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    data: str = typer.Option(..., "--data", help="calibration text (.txt), Alpaca .jsonl, or a hub dataset with --online"),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (permuted weights + layer ranking)"),
    tokens: int = typer.Option(65536, help="calibration tokens for head/neuron/channel scores"),
    layer_tokens: int = typer.Option(2048, help="tokens for the layer metric (drop-loss runs one pass per layer)"),
    layer_metric: str = typer.Option("drop-loss", help="drop-loss | block-influence"),
    seq_len: int = typer.Option(512, help="tokens per calibration window"),
    batch_size: int = typer.Option(8),
):
    """Score heads, neurons, channels and layers; permute so 'first k' = 'most important k'."""
    from compressor.data import load_data
    from compressor.importance import compute_importance, layer_ranking, permute
    from compressor.importance_io import save_importance

    loaded = _load(model)
    calib = load_data(loaded.tokenizer, data, seq_len, tokens, STATE["online"])
    layer_data = calib.subset(slice(0, max(1, layer_tokens // seq_len)))
    sn = loaded.supernet()
    scores = compute_importance(sn, calib, layer_data, layer_metric, batch_size)
    ranking = layer_ranking(scores)
    sorted_scores = permute(sn, scores)
    path = save_importance(loaded, sorted_scores, ranking, out)
    info = scores.info
    console.print(f"scored {info['calibration_tokens']:,} tokens in {info['seconds_activation']:.1f}s "
                  f"(+ layer {layer_metric} on {info['layer_tokens']:,} tokens, total {info['seconds_total']:.1f}s)")
    console.print(f"layer ranking (most important first): {ranking}")
    console.print(f"wrote {path}; use it as MODEL everywhere (e.g. nasprune extract {path} --arch ...)")


def train(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    data: str = typer.Option(..., "--data", help="training text (.txt) or Alpaca .jsonl (or a hub dataset with --online)"),
    out: Path = typer.Option(..., "--out", help="output nasprune model dir (LoRA merged) + training log"),
    strategy: str = typer.Option("importance-calibrate-mag", help="standard | random | grid-params | importance-random | "
                                 "importance-grid-params | importance-calibrate-mag"),
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
    untie_lm_head: bool = typer.Option(False, "--untie-lm-head", help="give lm_head its own weights so LoRA can adapt it"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    calib_data: Optional[str] = typer.Option(None, help="calibration data for importance-* strategies on a model "
                                             "without importance (default: the training data)"),
    seed: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT's checkpoint exactly"),
):
    """Fine-tune the super-network with the sandwich rule (full or LoRA)."""
    from compressor.train import TrainConfig, run_training

    overrides = {k: v for k, v in dict(strategy=strategy, steps=steps, max_minutes=max_minutes, batch_size=batch_size,
                                       grad_accum=grad_accum, seq_len=seq_len, lr=lr, lora=lora or None, lora_r=lora_r,
                                       lora_alpha=lora_alpha, untie_lm_head=untie_lm_head or None,
                                       gradient_checkpointing=gradient_checkpointing or None, seed=seed).items()
                 if v is not None}
    cfg = TrainConfig.load(config, overrides)
    path = run_training(model, data, out, cfg, resume=resume, online=STATE["online"], calib_data=calib_data)
    console.print(f"wrote {path}")


def evaluate(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    arch: Optional[str] = typer.Option(None, "--arch", help="sub-network JSON or file (default: the largest)"),
    data: Optional[str] = typer.Option(None, "--data", help="held-out text for perplexity"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated lm-eval task names (standard ones need --online)"),
    task_file: Optional[List[Path]] = typer.Option(None, "--task-file", help="local multiple-choice .jsonl task (repeatable)"),
    include_path: Optional[Path] = typer.Option(None, help="directory of lm-eval YAML task files"),
    limit: Optional[int] = typer.Option(None, help="examples per lm-eval task"),
    seq_len: int = typer.Option(512),
    max_tokens: int = typer.Option(32768, help="held-out tokens for perplexity"),
    via: str = typer.Option("both", help="supernet | extracted | both (perplexity path)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Perplexity (through the super-network and the extracted model) and lm-eval accuracy of a sub-network."""
    from compressor.evaluate import evaluate_subnetwork
    from compressor.search_space import SubNetwork

    loaded = _load(model)
    sub = SubNetwork.parse(arch) if arch else None
    result = evaluate_subnetwork(loaded, sub, data=data, tasks=tasks, task_files=task_file, include_path=include_path,
                                 limit=limit, seq_len=seq_len, max_tokens=max_tokens, via=via, online=STATE["online"])
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"sub-network {result['arch']} ({result['params']:,} params)")
    for key in ("ppl_supernet", "ppl_extracted"):
        if key in result:
            console.print(f"  {key}: {result[key]:.3f}")
    for task, metrics in result.get("tasks", {}).items():
        console.print(f"  {task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def search(
    model: str = typer.Argument(..., help="the trained super-network (nasprune model dir)"),
    predictor: Path = typer.Option(..., "--predictor", help="latency predictor dir (nasprune predictor fit)"),
    workload: str = typer.Option("prefill:1x128", "--workload", help="the workload latency is predicted for"),
    data: str = typer.Option(..., "--data", help="held-out text for the quality objective"),
    out: Path = typer.Option(..., "--out", help="output dir: pareto.json, pareto.csv, history.json, pareto.png"),
    max_latency_ms: Optional[float] = typer.Option(None, help="constraint: predicted latency <= X ms"),
    max_params: Optional[int] = typer.Option(None, help="constraint: parameters <= N"),
    params_objective: bool = typer.Option(False, "--params-objective", help="minimize parameters as a third objective"),
    generations: int = typer.Option(10, help="NSGA-II generations"),
    population: int = typer.Option(20, help="NSGA-II population"),
    eval_tokens: int = typer.Option(4096, help="held-out tokens per quality evaluation (fixed budget)"),
    seq_len: int = typer.Option(256),
    seed: int = typer.Option(0),
    strict: bool = typer.Option(False, "--strict", help="refuse sub-networks outside the predictor's training ranges"),
):
    """NSGA-II over super-network quality and predicted latency; writes the Pareto front."""
    from compressor.search import SearchConfig, run_search_cli

    cfg = SearchConfig(population=population, generations=generations, seed=seed, max_latency_ms=max_latency_ms,
                       max_params=max_params, params_objective=params_objective)
    result = run_search_cli(_load(model), predictor, workload, data, out, cfg, eval_tokens, seq_len, STATE["online"], strict)
    console.print(f"{len(result.evaluated)} sub-networks evaluated in {result.seconds:.0f}s; "
                  f"hypervolume {result.hypervolume[0]:.4g} -> {result.hypervolume[-1]:.4g}")
    table_rows = [p.row() for p in result.pareto]
    for i, r in enumerate(table_rows):
        a = r["arch"]
        console.print(f"  [{i}] e{a['embed_dim']}-h{a['num_heads']}-f{a['ffn_dim']}-l{a['num_layers']}: "
                      f"{r['params'] / 1e6:.1f}M params, ppl {r['ppl']:.2f}, predicted {r['predicted_ms']:.1f} ms")
    console.print(f"wrote {out}/pareto.json, pareto.csv, history.json, pareto.png")


def compress(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    out: Path = typer.Option(..., "--out", help="run directory (every stage's output; rerun to resume)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with every knob (see configs/demo.yaml)"),
    stop_after: Optional[str] = typer.Option(None, "--stop-after", help="stop after this stage"),
    force: Optional[List[str]] = typer.Option(None, "--force", help="re-run this stage even if done (repeatable)"),
):
    """The whole pipeline: importance, training, profiling, predictor, search, export, evaluation, report."""
    from compressor.cli import quiet_transformers
    from compressor.pipeline import Pipeline, PipelineConfig

    quiet_transformers()
    cfg = PipelineConfig.load(config)
    Pipeline(model, out, cfg, STATE["online"], log=lambda text: console.print(text, markup=False, highlight=False)).execute(
        stop_after, tuple(force or ()))
    console.print(f"report: {out}/report.md")
