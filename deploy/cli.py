"""CLI commands of the deploy stage: export, generate, check."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output


def register(app: typer.Typer) -> None:
    from compressor.core.console import handles_errors

    app.command("export")(handles_errors(export))
    app.command("generate")(handles_errors(generate))
    app.command("check")(handles_errors(check))


def _console():
    from compressor.core.console import console

    return console


def chosen_archs(
    arch: Optional[str], pareto: Optional[Path], pick: Optional[str]
) -> list[tuple[str, object, dict | None]]:
    """(name, SubNetwork, pareto row) for --arch or --pareto/--pick."""
    from compressor.elastic.search_space import SubNetwork

    if bool(arch) == bool(pareto):
        raise NaspruneError("give exactly one of --arch ARCH or --pareto FILE (with --pick 0,2)")
    if arch:
        return [("", SubNetwork.parse(arch), None)]
    if not Path(pareto).is_file():
        raise NaspruneError(f"pareto file {pareto} does not exist; run nasprune search first")
    try:
        rows = json.loads(Path(pareto).read_text())["pareto"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("arch"), dict) for r in rows):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise NaspruneError(
            f"{pareto} is not a nasprune pareto.json (a 'pareto' list of rows with an 'arch'); pass the "
            "pareto.json written by nasprune search"
        ) from None
    try:
        indices = [int(i) for i in (pick or ",".join(str(i) for i in range(len(rows)))).split(",") if i.strip()]
    except ValueError:
        raise NaspruneError(f"--pick must be comma-separated indices like 0,2 (got {pick})") from None
    bad = [i for i in indices if not 0 <= i < len(rows)]
    if bad:
        raise NaspruneError(f"--pick {bad} out of range: the front has {len(rows)} points (0..{len(rows) - 1})")
    return [(f"{i}", SubNetwork.from_dict(rows[i]["arch"]), rows[i]) for i in indices]


def _is_baseline_file(path: Path) -> bool:
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == "nasprune-baseline/1"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def export(
    model: str = typer.Argument(..., help="the (trained) super-network: nasprune model dir, 'default', ..."),
    out: Path = typer.Option(..., "--out", help="bundle dir (one arch) or parent dir (several)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="sub-network JSON or file"),
    pareto: Optional[Path] = typer.Option(None, "--pareto", help="pareto.json from nasprune search"),
    pick: Optional[str] = typer.Option(None, "--pick", help="comma-separated indices into the front (default: all)"),
    precision: List[str] = typer.Option(["fp32"], "--precision", help="fp32 | int8 | fp16 (repeatable)"),
    verify: bool = typer.Option(False, "--verify", help="measure the engines here and compare with the prediction"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor dir for predicted latency"),
    workload: List[str] = typer.Option(
        ["prefill:1x128"],
        "--workload",
        help="workloads to predict/measure (repeatable); each may be a weighted mix like "
        "'prefill:1x512 + 128*decode:1x512' (every term measured; the mix's ms is the weighted sum)",
    ),
    threads: int = typer.Option(1, help="intra-op threads for --verify"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing nasprune bundles at the targets"),
    repair: Optional[str] = typer.Option(
        None,
        "--repair",
        metavar="DATA",
        help="closed-form repair of every exported sub-network on this calibration data (.txt or Alpaca .jsonl)",
    ),
    repair_tokens: int = typer.Option(4096, "--repair-tokens", help="calibration tokens for --repair"),
    repair_eval: Optional[str] = typer.Option(
        None,
        "--repair-eval",
        metavar="TEXT",
        help="held-out text for perplexity before/after repair (default: the DATA tokens after the calibration ones)",
    ),
    repair_eval_tokens: int = typer.Option(2048, "--repair-eval-tokens", help="tokens for that perplexity"),
    calibration: Optional[str] = typer.Option(
        None, "--calibration", metavar="TEXT", help="text static INT8 precisions (int8-static*) calibrate on"
    ),
):
    """Export chosen sub-networks as engine bundles (HF checkpoint, optimized ONNX, INT8/FP16, TensorRT).

    Example: nasprune export runs/demo/supernet --pareto runs/demo/search/pareto.json --pick 0 --out runs/bundles
    """
    from compressor.core.console import STATE
    from compressor.elastic.modeldir import load_for_cli as _load
    from deploy.pipeline_steps import export_bundles, repair_for_export

    picks = chosen_archs(arch, pareto, pick)
    if repair is None and (repair_eval is not None):
        raise NaspruneError("--repair-eval measures a repair: add --repair DATA")
    loaded = _load(model)
    fix = None
    if repair:
        fix = repair_for_export(
            loaded, repair, repair_tokens, repair_eval, repair_eval_tokens, STATE["online"], log=_console().print
        )
    paths = export_bundles(
        loaded,
        picks,
        out,
        precision,
        predictor,
        workload,
        verify,
        threads,
        log=_console().print,
        overwrite=overwrite,
        repair=fix,
        calibration_data=calibration,
    )
    for p in paths:
        _console().print(f"wrote bundle {p}")


def generate(
    bundle: Path = typer.Argument(..., help="a bundle dir from nasprune export"),
    prompt: str = typer.Argument(..., help="the prompt"),
    max_new_tokens: int = typer.Option(32, help="tokens to generate (greedy)"),
    precision: str = typer.Option("fp32", "--precision", help="which engine variant to run"),
    chat: bool = typer.Option(True, "--chat/--raw", help="wrap the prompt in the tokenizer's chat template"),
):
    """Greedy generation on the bundle's ONNX graphs.

    Example: nasprune generate runs/demo/bundles/0-e288-h3-f448-l15 "Once upon a time" --max-new-tokens 16
    """
    from deploy.generate import generate_text

    if max_new_tokens < 1:
        raise NaspruneError(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    t = time.perf_counter()
    text = generate_text(bundle, prompt, max_new_tokens, precision, chat)
    print(text)
    _console().print(f"[dim]({max_new_tokens} tokens max, {time.perf_counter() - t:.1f}s, onnxruntime {precision})[/]")


def _threshold(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise NaspruneError(f"--threshold must look like 10% or 0.1 (got {text})") from None
    if not 0 < value < 10:
        raise NaspruneError(f"--threshold {text} is not a sensible fraction")
    return value


def check(
    bundle: Path = typer.Argument(..., help="a bundle dir from nasprune export"),
    baseline_bundle: Optional[Path] = typer.Option(
        None, "--baseline-bundle", help="the previous bundle: measured now, interleaved with BUNDLE (most reliable)"
    ),
    baseline: Optional[Path] = typer.Option(
        None, "--baseline", help="stored baseline JSON (created with --update-baseline)"
    ),
    threshold: str = typer.Option("10%", help="slowdown that fails the check"),
    min_effect: float = typer.Option(0.03, help="the CI's lower bound must exceed 1 + this"),
    quantile: float = typer.Option(0.10, help="statistic compared: this quantile of the samples (0.5 = median)"),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="measure and (re)write the --baseline file"),
    workload: str = typer.Option("prefill:1x128", "--workload"),
    precision: str = typer.Option("fp32", "--precision", help="engine variant to check"),
    threads: int = typer.Option(1),
    blocks: int = typer.Option(10, help="interleaved measurement blocks"),
    iters: int = typer.Option(20, help="iterations per block"),
    report: Optional[Path] = typer.Option(
        None, "--report", help="dir for check.json + check.junit.xml (default: BUNDLE/check)"
    ),
):
    """CI latency gate: exit 0 pass, 1 regression, 2 incomparable (another device or recipe).

    Example: nasprune check runs/demo/bundles/0-e288-h3-f448-l15 --baseline-bundle runs/demo/bundles/0-e288-h3-f448-l15
    """
    from compressor.core.workload import Workload
    from compressor.elastic.modeldir import write_json_atomic
    from deploy.measure import measure_blocks, measure_paired
    from deploy.regression import GateConfig, Measurement, compare, write_report

    if (baseline is None) == (baseline_bundle is None):
        raise NaspruneError("give exactly one of --baseline-bundle DIR (measure both now) or --baseline FILE (stored)")
    if update_baseline and baseline is None:
        raise NaspruneError("--update-baseline writes a --baseline FILE; add --baseline PATH")
    w = Workload.parse(workload)
    if not 0 < quantile < 1:
        raise NaspruneError(f"--quantile must be between 0 and 1 (got {quantile})")
    for flag, value in (("--threads", threads), ("--blocks", blocks), ("--iters", iters)):
        if value < 1:
            raise NaspruneError(f"{flag} must be >= 1, not {value}")
    cfg = GateConfig(threshold=_threshold(threshold), min_effect=min_effect, quantile=quantile)
    report = report or Path(bundle) / "check"
    claim_output(report, "check", overwrite=True)  # a check report is refreshed by every check, never a foreign dir
    if update_baseline and baseline.exists() and not _is_baseline_file(baseline):
        raise NaspruneError(
            f"--baseline {baseline} exists and is not a nasprune baseline; nasprune never replaces it, "
            "choose another path"
        )
    start = time.perf_counter()
    if baseline_bundle is not None:
        current, base = measure_paired(
            bundle, baseline_bundle, w, precision, threads, blocks=blocks, iters_per_block=iters
        )
    else:
        if not update_baseline:  # read before minutes of measuring
            if not baseline.is_file():
                raise NaspruneError(f"baseline {baseline} does not exist; create it with --update-baseline")
            try:
                base = Measurement.from_dict(json.loads(baseline.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise NaspruneError(
                    f"{baseline} is not a nasprune baseline; re-create it with --update-baseline"
                ) from None
        current = measure_blocks(bundle, w, precision, threads, blocks=blocks, iters_per_block=iters)
        if update_baseline:
            write_json_atomic(baseline, {"format": "nasprune-baseline/1", "bundle": str(bundle), **current.to_dict()})
            med = sorted(x for b in current.blocks for x in b)[len(current.blocks) * iters // 2]
            _console().print(f"baseline written to {baseline}: median {med:.2f} ms ({w}, {precision})")
            return
    verdict = compare(current, base, cfg)
    write_report(report, Path(bundle).name, verdict, current, base, cfg, time.perf_counter() - start)
    style = {"pass": "green", "regression": "red", "incomparable": "yellow"}[verdict.status]
    ms = (
        f" ({verdict.baseline_median_ms:.2f} -> {verdict.current_median_ms:.2f} ms)"
        if verdict.current_median_ms
        else ""
    )
    _console().print(f"[{style}]{verdict.status.upper()}[/]: {verdict.message}{ms}")
    raise typer.Exit(verdict.exit_code)
