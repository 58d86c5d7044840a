"""Export + verify, shared by ``nasprune export`` and the ``compress`` pipeline."""

from __future__ import annotations

import warnings
from pathlib import Path

from compressor.errors import NaspruneError
from compressor.outputs import claim_output, mark_output
from compressor.workload import Workload
from deploy.bundle import build_bundle, check_variants, read_manifest, update_manifest


def predictions(predictor, predictor_dir, sub, workloads: list[Workload], variants, recipe_ids: dict[str, str]) -> dict:
    """Predicted ms per variant/workload where a predictor for that precision + recipe exists."""
    if predictor is None:
        return {}
    group = predictor.group
    out = {}
    for variant in variants:
        if group["precision"] != variant or group["recipe_id"] != recipe_ids.get(variant):
            out[variant] = {"note": f"no predictor for {variant} with this export recipe: measured, not predicted"}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[variant] = {str(w): float(predictor.predict_ms([sub], w)[0]) for w in workloads}
        out[variant]["predictor"] = {"dir": str(predictor_dir), **group}
    return out


def verify(bundle: Path, workloads: list[Workload], variants, threads: int, predicted: dict, log=print) -> dict:
    """Measure every variant/workload here; report predicted vs measured."""
    from deploy.measure import measure_bundle

    measured = {}
    for variant in variants:
        measured[variant] = {}
        for w in workloads:
            r = measure_bundle(bundle, w, variant, threads)
            entry = {
                "stats_ms": r["stats_ms"],
                "fingerprint_id": r["fingerprint_id"],
                "env": r["env"],
                "threads": threads,
            }
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
) -> list[Path]:
    """One bundle at ``out`` (a single --arch), or one per pick under the bundles dir ``out``.

    Every input is checked and every target claimed before the first (minutes-long) export, so a
    refusal costs nothing and leaves nothing behind."""
    out = Path(out)
    check_variants(variants)
    ws = [Workload.parse(w) if isinstance(w, str) else w for w in workloads]
    if threads < 1:
        raise NaspruneError(f"--threads must be >= 1, not {threads}")
    sn = loaded.supernet()
    for _, sub, _ in picks:
        sn.space.validate(sub)
    predictor = None
    if predictor_dir is not None:
        from predictors import load_predictor

        predictor = load_predictor(predictor_dir)
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
        bundle = build_bundle(
            loaded, sn, sub, target, variants=tuple(variants), search_row=row, log=log, overwrite=overwrite
        )
        manifest = read_manifest(bundle)
        recipe_ids = {v: e.get("recipe_id") for v, e in manifest["engines"].items()}
        predicted = predictions(predictor, predictor_dir, sub, ws, variants, recipe_ids)
        update_manifest(bundle, latency={"predicted": predicted})
        if do_verify:
            update_manifest(bundle, latency={"measured": verify(bundle, ws, variants, threads, predicted, log)})
        paths.append(bundle)
    return paths
