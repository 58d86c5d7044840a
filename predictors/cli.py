"""``nasprune predictor fit|eval`` and ``nasprune predict``: registered on the main Typer app.

The shared console, ``--online`` state and one-line error handler come from the leaf
``compressor.core.console``; the app itself is assembled in ``nasprune.cli``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from compressor.core.console import STATE, console, err_console, handles_errors
from compressor.core.console import quiet_transformers as quiet_transformers
from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output

_FP = typer.Option(None, "--fingerprint", help="Device fingerprint id to select from the store.")
_ENGINE = typer.Option(None, "--engine", help="Engine to select (onnxruntime, tensorrt, torch).")
_PRECISION = typer.Option(None, "--precision", help="Precision to select (e.g. fp32, fp16).")
_RECIPE = typer.Option(None, "--recipe", help="Export recipe id to select.")


def metrics_table(title: str, rows: dict[str, dict], marked: str | None = None) -> Table:
    table = Table(title=title)
    for col in ("", "n", "MAPE %", "RMSPE %", "±5%", "±10%", "±15%", "Kendall τ"):
        table.add_column(col, justify="left" if not col else "right")
    for name, m in rows.items():
        label = f"{name} *" if name == marked else name
        table.add_row(
            label,
            str(m["n"]),
            f"{m['mape']:.2f}",
            f"{m['rmspe']:.2f}",
            f"{m['acc5']:.1%}",
            f"{m['acc10']:.1%}",
            f"{m['acc15']:.1%}",
            f"{m['kendall_tau']:.3f}",
        )
    return table


def _show_warnings(caught) -> None:
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)


def _online() -> bool:
    return bool(STATE["online"])


def fit_cmd(
    store: Path = typer.Option(..., "--store", help="Profile store to fit on."),
    out: Path = typer.Option(..., "--out", help="Predictor directory to write."),
    model: Optional[str] = typer.Option(
        None, "--model", help="The profiled MODEL (default: the records' model.source)."
    ),
    fingerprint: Optional[str] = _FP,
    engine: Optional[str] = _ENGINE,
    precision: Optional[str] = _PRECISION,
    recipe: Optional[str] = _RECIPE,
    models: str = typer.Option(
        ",".join(["linear", "gbrt", "random_forest"]), "--models", help="Comma-separated candidate model types."
    ),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds (grouped by architecture)."),
    seed: int = typer.Option(0, "--seed"),
    anchors: int = typer.Option(
        1,
        "--anchors",
        help="calibration anchors to store (the largest + mid-sized ones); calibration uses their median ratio",
    ),
    adaptive: Optional[str] = typer.Option(
        None, "--adaptive", metavar="MODEL", help="Profile more sub-networks of MODEL where CV error is largest."
    ),
    target_acc10: float = typer.Option(0.97, "--target-acc10", help="Adaptive: stop at this ±10% CV accuracy."),
    target_mape: float = typer.Option(4.0, "--target-mape", help="Adaptive: ... and this CV MAPE (%)."),
    budget_min: float = typer.Option(30.0, "--budget-min", help="Adaptive: stop after this many minutes."),
    batch: int = typer.Option(8, "--batch", help="Adaptive: sub-networks profiled per round."),
    workload: List[str] = typer.Option(
        [], "--workload", help="Adaptive: workload to profile, repeatable (default: those in the store)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing predictor at --out."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Adaptive: profiler threads."),
    reference: Optional[Path] = typer.Option(
        None,
        "--reference",
        help="A predictor of this device and engine at another precision (fp32): adds the ratio-to-it "
        "and affine-to-it candidates.",
    ),
):
    """Fit a latency predictor on one (device, engine, precision, recipe) group of a profile store.

    Example: nasprune predictor fit --store runs/profiles.sqlite --out runs/predictor-cpu
    """
    _fit(**locals())  # locals() here: exactly the command's parameters


def _fit(
    *,
    store: Path,
    out: Path,
    model: Optional[str],
    fingerprint: Optional[str],
    engine: Optional[str],
    precision: Optional[str],
    recipe: Optional[str],
    models: str,
    folds: int,
    seed: int,
    anchors: int,
    adaptive: Optional[str],
    target_acc10: float,
    target_mape: float,
    budget_min: float,
    batch: int,
    workload: List[str],
    overwrite: bool,
    threads: Optional[int],
    reference: Optional[Path],
) -> None:
    claim_output(out, "predictor", overwrite=overwrite)  # before profiling/fitting, not after
    from predictors.fit import FitConfig

    quiet_transformers()
    config = FitConfig(
        folds=folds,
        seed=seed,
        candidates=tuple(m.strip() for m in models.split(",") if m.strip()),
        anchors=anchors,
    )
    wanted = dict(fingerprint_id=fingerprint, engine=engine, precision=precision, recipe_id=recipe)
    if adaptive and reference is not None:
        raise NaspruneError("--reference is for a direct fit; --adaptive profiles until the precision fits alone")
    if adaptive:
        from predictors.adaptive import AdaptiveConfig, adaptive_fit

        result = adaptive_fit(
            adaptive,
            store,
            config,
            AdaptiveConfig(
                target_acc10=target_acc10,
                target_mape=target_mape,
                budget_s=budget_min * 60,
                batch=batch,
                workloads=tuple(workload),
                threads=threads,
                engine=engine,
                precision=precision,
            ),
            wanted,
            online=_online(),
            log=console.print,
        )
    else:
        result = _direct_fit(store, wanted, model, reference, config)
    result.predictor.save(out, overwrite=overwrite)
    _show_fit(result.predictor.manifest, config, out)


def _direct_fit(store: Path, wanted: dict, model: Optional[str], reference: Optional[Path], config):
    """Cross-validate the candidates on the store's ``wanted`` group (optionally against ``reference``)."""
    from predictors import load_predictor
    from predictors.dataset import read_store, select_group
    from predictors.fit import fit_predictor
    from predictors.modelspace import describe_model, resolve_source

    records = select_group(read_store(store), **wanted)
    source = model or resolve_source(records[0]["model"].get("source"))
    with console.status(f"reading the search space of {source} ..."):
        description = describe_model(source, online=_online())
    ref = load_predictor(reference) if reference is not None else None
    with console.status(f"cross-validating {', '.join(config.candidates)} on {len(records)} records ..."):
        return fit_predictor(records, description, config, reference=ref)


def _show_fit(m: dict, config, out: Path) -> None:
    """The CV table of a fitted predictor's manifest ``m`` and where it was written."""
    console.print(
        metrics_table(
            f"{config.folds}-fold CV (grouped by sub-network), {m['training']['n_records']} records, "
            f"{m['training']['n_subnetworks']} sub-networks",
            m["cv"]["models"],
            m["cv"]["selected"],
        )
    )
    console.print(
        f"wrote {out}: {m['cv']['selected']} predictor for {', '.join(f'{k}={v}' for k, v in m['group'].items())} "
        f"({', '.join(m['training']['workloads'])})"
    )


def eval_cmd(
    directory: Path = typer.Argument(..., help="Predictor directory."),
    store: Path = typer.Option(..., "--store", help="Profile store with records not used in fitting."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a measured-vs-predicted PNG here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write metrics and per-record values here."),
    strict: bool = typer.Option(False, "--strict", help="Refuse records outside the training ranges."),
):
    """Score a predictor on held-out records: MAPE, RMSPE, ±5/10/15% accuracy, Kendall τ.

    Example: nasprune predictor eval runs/predictor-cpu --store runs/profiles.sqlite --plot runs/eval.png
    """
    from compressor.elastic.modeldir import write_json_atomic
    from predictors import load_predictor
    from predictors.dataset import read_store
    from predictors.evaluate import evaluate

    quiet_transformers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = load_predictor(directory, strict=strict)
    _show_warnings(caught)
    result = evaluate(predictor, read_store(store))
    for line in result.warnings:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    console.print(
        metrics_table(
            f"held-out evaluation ({predictor.manifest['estimator']['selected']})",
            {**result.per_workload, "all": result.overall},
        )
    )
    if plot:
        from predictors.plot import measured_vs_predicted_png

        measured_vs_predicted_png(
            plot, result.measured_ms, result.predicted_ms, result.workloads, title=f"{directory.name}: held-out"
        )
        console.print(f"wrote {plot}")
    if json_out:
        write_json_atomic(json_out, result.to_dict())
        console.print(f"wrote {json_out}")


def predict_cmd(
    directory: Path = typer.Argument(..., help="Predictor directory."),
    arch: str = typer.Option(..., "--arch", help='Sub-network JSON {"embed_dim":..,...} or a file.'),
    workload: str = typer.Option(..., "--workload", help="e.g. prefill:1x128 or decode:1x256."),
    quantile: str = typer.Option("median", "--quantile", help="median or p90."),
    strict: bool = typer.Option(False, "--strict", help="Refuse queries outside the training ranges."),
    fingerprint: Optional[str] = typer.Option(
        None, "--fingerprint", help="Refuse unless fitted for this device fingerprint."
    ),
    engine: Optional[str] = typer.Option(None, "--engine", help="Refuse unless fitted for this engine."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Refuse unless fitted for this precision."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Refuse unless fitted for this export recipe."),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="Re-measure the predictor's anchor sub-network now; scale by the machine's drift."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="With --calibrate: the profiled MODEL (default: the predictor's model.source)."
    ),
):
    """Predicted latency (ms) of one sub-network on one workload.

    Example: nasprune predict runs/predictor-cpu --workload prefill:1x128
    --arch '{"embed_dim":432,"num_heads":6,"ffn_dim":1152,"num_layers":22}'
    """
    from compressor.core.workload import Workload
    from compressor.elastic.search_space import SubNetwork
    from predictors import load_predictor

    quiet_transformers()
    sub, wl = SubNetwork.parse(arch), Workload.parse(workload)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = load_predictor(directory, strict=strict)
        predictor.check_compatible(fingerprint, engine, precision, recipe)
        predictor.space.validate(sub)  # a bad --arch fails before the anchor is measured
        if calibrate:
            predictor = _calibrated(predictor, model, wl)
        ms = float(predictor.predict_ms([sub], wl, quantile=quantile)[0])
    _show_warnings(caught)
    print(f"{ms:.3f}")
    err_console.print(
        f"{sub} {wl} {quantile}: {ms:.3f} ms ({predictor.manifest['estimator']['selected']}, "
        f"CV MAPE {predictor.manifest['cv']['models'][predictor.manifest['estimator']['selected']]['mape']:.2f}%)",
        highlight=False,
    )
    if calibrate:
        c = predictor.calibrations[str(wl)]
        err_console.print(
            f"calibrated: anchor {c.now_ms:.2f} ms now vs {c.fit_ms:.2f} ms at fit ({c.fit_source}), "
            f"x{c.factor:.4g}, the median of {len(c.anchors) or 1} anchor ratio(s), measured in {c.seconds:.1f} s",
            highlight=False,
        )


def _calibrated(predictor, model: Optional[str], workload):
    """The predictor scaled by its anchor, profiled now on ``model`` (default: the one it was fitted on)."""
    from compressor.elastic.modeldir import load_for_cli
    from predictors.calibration import calibrate, profile_anchor, stored_anchor
    from predictors.modelspace import resolve_source

    stored_anchor(predictor)  # no anchor: fail before loading a model
    loaded = load_for_cli(model or resolve_source(predictor.manifest["model"].get("source")))
    with err_console.status("measuring the calibration anchors ..."):
        return calibrate(predictor, [workload], profile_anchor(loaded, predictor))


def register(app: typer.Typer) -> None:
    """Add ``predictor fit|eval`` and ``predict`` to ``app``."""
    group = typer.Typer(no_args_is_help=True, help="Fit, check and evaluate latency predictors.")
    group.command("fit")(handles_errors(fit_cmd))
    group.command("eval")(handles_errors(eval_cmd))
    app.add_typer(group, name="predictor")
    app.command("predict")(handles_errors(predict_cmd))
