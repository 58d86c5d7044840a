"""Export + verify, shared by ``nasprune export`` and the ``compress`` pipeline."""

from __future__ import annotations

import warnings
from pathlib import Path

from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output, mark_output
from compressor.core.precisions import needs_calibration
from compressor.core.workload import WorkloadMix
from compressor.quant.quantize import static_calibration
from deploy.bundle import build_bundle, check_variants, read_manifest, update_manifest


def _fitted_kinds(predictors: dict, workloads: list[WorkloadMix]) -> None:
    """Refuse, before any export, a workload (or mix term) of a kind a predictor was never fitted on."""
    from predictors.mix import workload_out_of_range

    for predictor in predictors.values():
        for mix in workloads:
            for w in mix.workloads:
                workload_out_of_range(predictor, w)  # raises for an unfitted kind; a longer length only extrapolates


def predictions(predictors: dict, sub, workloads: list[WorkloadMix], variants, recipe_ids: dict[str, str]) -> dict:
    """Predicted ms per variant/workload where a predictor for that precision + recipe exists.

    A mix: each term's prediction under the term's workload string, and their weighted sum under
    the mix's string (the same sum the search ranked by, :func:`predictors.mix.predict_mix_ms`)."""
    if not predictors:
        return {}
    workloads = [WorkloadMix.of(w) for w in workloads]
    out = {}
    for variant in variants:
        match = [
            (d, p)
            for d, p in predictors.items()
            if p.group["precision"] == variant and p.group["recipe_id"] == recipe_ids.get(variant)
        ]
        if not match:
            out[variant] = {"note": f"no predictor for {variant} with this export recipe: measured, not predicted"}
            continue
        directory, predictor = match[0]
        out[variant] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for mix in workloads:
                terms = {w: float(predictor.predict_ms([sub], w)[0]) for w in mix.workloads}
                out[variant].update({str(w): ms for w, ms in terms.items()})
                out[variant][str(mix)] = float(mix.expected(terms.__getitem__))
        out[variant]["predictor"] = {"dir": directory, **predictor.group}
    return out


def verify(bundle: Path, workloads: list[WorkloadMix], variants, threads: int, predicted: dict, log=print) -> dict:
    """Measure every variant/workload here; report predicted vs measured.

    A mix is stored under its own string like a workload, ``stats_ms.median`` being the weighted sum
    of its terms' medians (so reports read it as one latency), with each term's measurement under
    ``terms``; a workload shared by several mixes is measured once per variant."""
    from deploy.measure import measure_mix

    workloads = [WorkloadMix.of(w) for w in workloads]
    measured = {}
    for variant in variants:
        measured[variant] = {}
        runs: dict = {}  # workload -> measurement, shared by every mix of this variant
        for w in workloads:
            r = measure_mix(bundle, w, variant, threads, measured=runs)
            entry = {
                "stats_ms": r["stats_ms"],
                "fingerprint_id": r["fingerprint_id"],
                "env": r["env"],
                "threads": threads,
            }
            term_lines = []
            if w.single is None:
                entry.update(terms=r["terms"], note=r["note"])
                for t in entry["terms"]:
                    term_pred = predicted.get(variant, {}).get(t["workload"])
                    shown = f"      {t['weight']:g} x {t['workload']}: measured {t['stats_ms']['median']:.2f} ms"
                    if isinstance(term_pred, float):
                        t["predicted_ms"], t["error"] = term_pred, t["stats_ms"]["median"] / term_pred - 1
                        shown += f", predicted {term_pred:.2f} ms ({t['error']:+.1%})"
                    term_lines.append(shown)
            pred = predicted.get(variant, {}).get(str(w))
            if isinstance(pred, float):
                entry["predicted_ms"] = pred
                entry["error"] = r["stats_ms"]["median"] / pred - 1
                same = predicted[variant]["predictor"]["fingerprint_id"] == r["fingerprint_id"]
                entry["same_device_as_predictor"] = same
                log(
                    f"    {variant} {w}: measured {r['stats_ms']['median']:.1f} ms, predicted {pred:.1f} ms "
                    f"({entry['error']:+.1%}){'' if same else ' [predictor is for another device fingerprint]'}"
                )
            else:
                log(f"    {variant} {w}: measured {r['stats_ms']['median']:.1f} ms (no matching predictor)")
            for line in term_lines:
                log(line)
            measured[variant][str(w)] = entry
    return measured


def export_bundles(
    loaded,
    picks,
    out: Path,
    variants,
    predictor_dir,
    workloads,
    do_verify: bool,
    threads: int = 1,
    log=print,
    overwrite: bool = False,
    repair=None,
    calibration_data: str | None = None,
) -> list[Path]:
    """One bundle at ``out`` (a single --arch), or one per pick under the bundles dir ``out``.

    ``calibration_data``: the text static INT8 variants calibrate their activation ranges on
    (required when one is asked for).

    ``repair``: None, or ``repair(sub) -> (model or None, record)``: the model to ship instead of the
    plain extraction (closed-form repaired) and the manifest's ``repair`` section.

    Every input is checked and every target claimed before the first (minutes-long) export, so a
    refusal costs nothing and leaves nothing behind."""
    out = Path(out)
    check_variants(variants)
    static = [v for v in variants if needs_calibration(v)]
    if static and calibration_data is None:
        raise NaspruneError(f"{static}: static INT8 needs calibration text (--calibration TEXT)")
    calibration = static_calibration(loaded.tokenizer, calibration_data) if static else None
    ws = [WorkloadMix.of(w) for w in workloads]  # a workload or a weighted mix (prefill:1x512 + 128*decode:1x512)
    if threads < 1:
        raise NaspruneError(f"--threads must be >= 1, not {threads}")
    sn = loaded.supernet()
    for _, sub, _ in picks:
        sn.space.validate(sub)
    from search.driver import load_predictors  # the one loader (search's layer, below deploy)

    predictors = load_predictors(predictor_dir)
    _fitted_kinds(predictors, ws)
    single = len(picks) == 1 and not picks[0][0]
    if not single:
        claim_output(out, "bundles", resume=True)  # a bundles dir collects bundles over several exports
    targets = [out if single else out / (f"{name}-{sub}" if name else str(sub)) for name, sub, _ in picks]
    for target in targets:
        claim_output(target, "bundle", overwrite=overwrite)
    if not single:
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "bundles")
    paths = []
    for (_name, sub, row), target in zip(picks, targets):
        log(f"bundle {target}: {sub}")
        model, record = repair(sub) if repair is not None else (None, None)
        bundle = build_bundle(
            loaded,
            sn,
            sub,
            target,
            variants=tuple(variants),
            search_row=row,
            log=log,
            overwrite=overwrite,
            model=model,
            repair=record,
            calibration=calibration,
        )
        manifest = read_manifest(bundle)
        recipe_ids = {v: e.get("recipe_id") for v, e in manifest["engines"].items()}
        predicted = predictions(predictors, sub, ws, variants, recipe_ids)
        update_manifest(bundle, latency={"predicted": predicted})
        if do_verify:
            update_manifest(bundle, latency={"measured": verify(bundle, ws, variants, threads, predicted, log)})
        paths.append(bundle)
    return paths


def repair_for_export(
    loaded, data: str, tokens: int, eval_text: str | None, eval_tokens: int, online: bool, teacher=None, log=None
):
    """``repair(sub) -> (model, record)`` for :func:`export_bundles`: closed-form repair on the calibration
    ``data`` (targets from ``teacher``, default the parent itself), perplexity before/after on
    ``eval_text`` (or the ``data`` tokens after the calibration ones). Every input is read and checked
    here, before any bundle is claimed or exported."""
    from compressor.core.data import calibration_text, resolve_data
    from compressor.elastic.evaluate import token_windows
    from compressor.recovery.repair import (
        RepairConfig,
        calibration_and_heldout,
        check_repairable,
        repair_and_measure,
    )

    if eval_tokens < 0:
        raise NaspruneError(f"--repair-eval-tokens must be >= 0, not {eval_tokens}")
    check_repairable(loaded)
    if loaded.tokenizer is None:
        raise NaspruneError("repair needs the model's tokenizer; the model dir has none")
    if eval_text is not None and resolve_data(eval_text) == resolve_data(data):
        raise NaspruneError(f"--repair-eval {eval_text} is the repair data; give text repair never fits on")
    cfg = RepairConfig(tokens=tokens)
    own = eval_tokens if eval_text is None else 0  # held-out share of DATA only without a separate text
    windows, heldout = calibration_and_heldout(loaded.tokenizer, data, cfg, online, own)
    source = f"held-out tokens of {data} after the {windows.numel():,} calibration tokens"
    if eval_tokens == 0:
        heldout, source = None, "--repair-eval-tokens 0"
    elif eval_text is not None:
        heldout = token_windows(loaded.tokenizer, calibration_text(eval_text, online), cfg.seq_len, eval_tokens)
        source = str(eval_text)
    elif heldout is None:
        source = f"{data} has no text left after the calibration tokens (give --repair-eval)"
    log = log or print

    def fix(sub):
        return repair_and_measure(loaded, sub, windows, cfg, heldout, source, data, log=log, teacher_loaded=teacher)

    return fix
