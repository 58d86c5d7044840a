"""The one ``nasprune`` command line: the Typer app that every stage registers its commands on,
plus the orchestration commands (``search``, ``compress``) that sit above all stages.

Hub access is off (``HF_HUB_OFFLINE=1``) unless ``--online`` is given. Every user-facing problem
is a :class:`~compressor.core.errors.NaspruneError` and prints as one line with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from compressor.core.console import offline_by_default

offline_by_default(sys.argv)  # before any Hugging Face import reads the environment

import typer  # noqa: E402

from compressor import cli as compressor_cli  # noqa: E402
from compressor.core.console import STATE, console, handles_errors, quiet_transformers  # noqa: E402
from compressor.elastic.modeldir import load_for_cli  # noqa: E402
from deploy import cli as deploy_cli  # noqa: E402
from predictors import cli as predictors_cli  # noqa: E402
from profilers import cli as profilers_cli  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress a decoder LLM into a Pareto front of faster sub-networks and ship them as engines.",
)


@app.callback()
def _global(
    online: bool = typer.Option(
        False, "--online", help="Allow Hugging Face hub downloads (models, datasets, lm-eval tasks)."
    ),
):
    STATE["online"] = online


def search(
    model: str = typer.Argument(..., help="the trained super-network (nasprune model dir)"),
    predictor: List[Path] = typer.Option(
        ...,
        "--predictor",
        help="latency predictor dir (nasprune predictor fit); repeat with one per precision to search precision too",
    ),
    precision: List[str] = typer.Option(
        [], "--precision", help="precisions to search (default: every precision a --predictor was fitted for)"
    ),
    workload: str = typer.Option(
        "prefill:1x128",
        "--workload",
        help="the workload latency is predicted for, or a weighted mix: 'prefill:1x512 + 128*decode:1x512' "
        "(terms joined by ' + ', spaces required; latency = sum of weight x prediction)",
    ),
    data: str = typer.Option(..., "--data", help="held-out text for the quality objective"),
    out: Path = typer.Option(..., "--out", help="output dir: pareto.json, pareto.csv, history.json, pareto.png"),
    max_latency_ms: Optional[float] = typer.Option(None, help="constraint: predicted latency <= X ms"),
    max_params: Optional[int] = typer.Option(None, help="constraint: parameters <= N"),
    params_objective: bool = typer.Option(False, "--params-objective", help="minimize parameters as a third objective"),
    generations: int = typer.Option(10, help="NSGA-II generations"),
    population: int = typer.Option(20, help="NSGA-II population"),
    minutes: Optional[float] = typer.Option(
        None, help="wall-clock budget: stop before a generation that would end after it (at least one runs)"
    ),
    eval_tokens: int = typer.Option(4096, help="held-out tokens per quality evaluation (fixed budget)"),
    seq_len: int = typer.Option(256),
    seed: int = typer.Option(0),
    strict: bool = typer.Option(False, "--strict", help="refuse sub-networks outside the predictor's training ranges"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing nasprune search output at --out"),
    calibrate: bool = typer.Option(
        False, "--calibrate/--no-calibrate", help="re-measure the predictor's anchor; scale predictions by the drift"
    ),
    calibration: Optional[str] = typer.Option(
        None, "--calibration", help="text static INT8 recipes calibrate on (needed when one is searched)"
    ),
    store: Optional[Path] = typer.Option(
        None,
        "--store",
        help="the profile store the predictors were fitted on: without --precision, recipes it measured no faster "
        "than fp32 are left out, as compress leaves them out",
    ),
):
    """NSGA-II over super-network quality and predicted latency; writes the Pareto front.

    Example: nasprune search runs/demo/supernet --predictor runs/demo/predictor --data val.txt --out runs/s
    """
    from search.driver import run_search_cli
    from search.problem import SearchConfig

    cfg = SearchConfig(
        population=population,
        generations=generations,
        seed=seed,
        max_latency_ms=max_latency_ms,
        max_params=max_params,
        params_objective=params_objective,
        precisions=_searched_precisions(predictor, list(precision) or None, store),
        max_minutes=minutes,
    )
    result = run_search_cli(
        load_for_cli(model),
        predictor[0] if len(predictor) == 1 else list(predictor),
        workload,
        data,
        out,
        cfg,
        eval_tokens,
        seq_len,
        STATE["online"],
        strict,
        overwrite,
        calibrate=calibrate,
        calibration_data=calibration,
    )
    _print_front(result, out)


def _searched_precisions(predictor: List[Path], precision: Optional[List[str]], store: Optional[Path]):
    """``--precision`` as given; else, with ``--store``, the predictors' precisions less the recipes the
    store measured no faster than fp32: the decision ``compress`` takes (:func:`search.driver.searched_precisions`).
    None: every predictor's precision (the driver's default)."""
    if precision is not None or store is None:
        return precision
    from search.driver import by_precision, load_predictors, searched_precisions

    predictors = by_precision(load_predictors(list(predictor)))
    engine = next(iter(predictors.values())).group["engine"]
    kept, slower = searched_precisions(list(predictors), None, store, engine, log=_log)
    return kept if slower else None


def _log(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def _print_front(result, out: Path) -> None:
    console.print(
        f"{len(result.evaluated)} sub-networks evaluated in {result.seconds:.0f}s; "
        f"hypervolume {result.hypervolume[0]:.4g} -> {result.hypervolume[-1]:.4g}"
    )
    table_rows = [p.row() for p in result.pareto]
    for i, r in enumerate(table_rows):
        a = r["arch"]
        console.print(
            f"  [{i}] e{a['embed_dim']}-h{a['num_heads']}-f{a['ffn_dim']}-l{a['num_layers']}: "
            f"{r['params'] / 1e6:.1f}M params, ppl {r['ppl']:.2f}, predicted {r['predicted_ms']:.1f} ms"
        )
    console.print(f"wrote {out}/pareto.json, pareto.csv, history.json, pareto.png")


def compress(
    model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
    out: Path = typer.Option(..., "--out", help="run directory (every stage's output; rerun to resume)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with every knob (see configs/demo.yaml)"),
    stop_after: Optional[str] = typer.Option(None, "--stop-after", help="stop after this stage"),
    force: Optional[List[str]] = typer.Option(None, "--force", help="re-run this stage even if done (repeatable)"),
):
    """The whole pipeline: importance, training, profiling, predictor, search, export, evaluation, report.

    Example: nasprune compress default --out runs/demo --config configs/demo.yaml --stop-after search
    """
    from nasprune.pipeline import Pipeline, PipelineConfig

    quiet_transformers()
    cfg = PipelineConfig.load(config)
    Pipeline(model, out, cfg, STATE["online"], log=_log).execute(stop_after, tuple(force or ()))
    console.print(f"report: {out}/report.md")


# ``nasprune --help`` in three panels, each in this order: the pipeline, its stages one at a time, tools
PIPELINE, STAGES, TOOLS = "Pipeline", "Stages (what compress runs, one at a time)", "Tools"
ORDER = {
    PIPELINE: ["compress"],
    STAGES: ["importance", "train", "profile", "predictor", "search", "refine", "export", "check"],
    TOOLS: ["info", "extract", "eval", "predict", "generate", "distill-blocks", "block-scores"],
}
PANELS = {name: panel for panel, names in ORDER.items() for name in names}

compressor_cli.register(app)
profilers_cli.register(app)
predictors_cli.register(app)
deploy_cli.register(app)
app.command("search")(handles_errors(search))
app.command("compress")(handles_errors(compress))
_RANK = {name: i for i, name in enumerate(n for names in ORDER.values() for n in names)}
app.registered_commands.sort(key=lambda c: _RANK.get(c.name or "", len(_RANK)))
for _info in [*app.registered_commands, *app.registered_groups]:
    _info.rich_help_panel = PANELS.get(_info.name or "", TOOLS)


def main():
    app()


if __name__ == "__main__":
    main()
