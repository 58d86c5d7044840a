"""Predictor drift: a predictor fitted in one profiling run, checked on sub-networks profiled in
another run, uncalibrated vs anchor-calibrated (``predictors/calibration.py``).

Default (a quiet machine, reproducible from this repo): fit on benchmarks/predictor_accuracy.py's
train store (74 sub-networks x 4 workloads, 02:59-04:43 UTC), check on its eval store, a separate
run (02:29-02:59) holding 32 other sub-networks and 8 training ones again, the largest (the anchor)
among them. Demo runs on a loaded machine::

    python benchmarks/predictor_drift.py --fit-store benchmarks/results/predictor_drift_demo_fit.sqlite \\
        --model runs/demo/supernet --folds 4 --compare-predictor runs/demo/predictor \\
        --later benchmarks/results/predictor_drift_demo_later1.sqlite --later ..._later2.sqlite ... \\
        --out benchmarks/results/predictor_drift_demo_loaded.json

where the fit store is ``make demo``'s (16 sub-networks, prefill:1x128, ONNX Runtime CPU fp32,
1 thread) and each later store one ``nasprune profile`` run with the demo's protocol (later1:
``--samples 13 --seed 7 --sampler random --max-remeasure 1``; later2/3: 11 random + 3 of the fit
run's sub-networks, ``--max-remeasure 3``)::

    nasprune profile runs/demo/supernet --workload prefill:1x128 --samples 13 --seed 7 \\
        --sampler random --store LATER.sqlite --threads 1 --warmup-iters 2 --warmup-seconds 0.3 \\
        --min-iters 8 --min-seconds 1.0 --max-remeasure 1

``nasprune profile`` always includes the largest sub-network, which is the predictor's anchor: its
record in the other run is "the anchor measured now". The predictor is re-fitted here on the fit
store with the original settings (deterministic: it predicts what the saved predictor predicts,
checked with --compare-predictor) because predictors fitted before anchors existed carry none.

Held-out sub-networks of a later run are split into *inside* the fitted ranges (error = drift +
interpolation) and *outside* them (+ extrapolation to corners of the space); sub-networks the fit
run also measured (other than the anchor) give the machine's pure drift.

    python benchmarks/predictor_drift.py --later LATER1.sqlite [--later LATER2.sqlite ...]

Writes benchmarks/results/predictor_drift.json.

Quantized precisions (``--precision``, repeatable): each precision's predictor is fitted the way
``nasprune compress`` fits it, with the fp32 predictor of the same store as its reference (so the
``ratio-``/``affine-to-fp32`` candidates enter the grouped CV), and calibrated by its own anchor
(the largest sub-network *at that precision*, which every ``nasprune profile --precision P`` run
includes). ``--anchors K``: each fitted predictor stores K anchors and the last column calibrates
with the median of those a later run re-timed (``nasprune predictor fit --anchors K``). Session
11's run on a 2-vCPU AMD EPYC with VNNI (fit: 30 fp32 + 16 int8-pc + 14 int8-mixed random
sub-networks; later1: 11 other ones per precision; later2: the 3 anchors first, then 9 others)::

    python benchmarks/predictor_drift.py --fit-store benchmarks/results/predictor_drift_prec_fit.sqlite \\
        --precision fp32 --precision int8-pc --precision int8-mixed --folds 4 --anchors 3 \\
        --compare-predictor none --later benchmarks/results/predictor_drift_prec_later1.sqlite \\
        --later benchmarks/results/predictor_drift_prec_later2.sqlite --out benchmarks/results/predictor_drift_prec.json

Session 13's run on a 2-vCPU Intel Xeon with AVX-512 VNNI (fit as above; later1 and later2: 10
random sub-networks per precision each, ``--seed 7`` / ``--seed 8``, the anchor among them)::

    python benchmarks/predictor_drift.py --fit-store benchmarks/results/predictor_drift_xeon_fit.sqlite \\
        --precision fp32 --precision int8-pc --precision int8-mixed --folds 4 --anchors 3 \\
        --compare-predictor none --later benchmarks/results/predictor_drift_xeon_later1.sqlite \\
        --later benchmarks/results/predictor_drift_xeon_later2.sqlite --out benchmarks/results/predictor_drift_xeon.json
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit-store", type=Path, default=RESULTS / "predictor_accuracy_train.sqlite")
    p.add_argument("--model", default="default", help="the profiled model (its search space)")
    p.add_argument("--compare-predictor", type=Path, default=RESULTS / "predictor_accuracy_predictor")
    p.add_argument("--later", type=Path, action="append", help="another run's store (repeatable)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument(
        "--anchors", type=int, default=3, help="calibration anchors each fitted predictor stores (the last column)"
    )
    p.add_argument(
        "--precision",
        action="append",
        help="precision(s) to check (repeatable; default fp32); a quantized one is fitted with the fp32 "
        "predictor of the same store as its reference, as compress does",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "predictor_drift.json")
    args = p.parse_args(argv)
    args.later = args.later or [RESULTS / "predictor_accuracy_eval.sqlite"]
    args.precision = args.precision or ["fp32"]
    return args


def signed(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return (predicted - measured) / measured


def score(measured: np.ndarray, predicted: np.ndarray) -> dict:
    from predictors.metrics import accuracy_within, mape

    if measured.size == 0:
        return {"n": 0}
    e = signed(measured, predicted)
    return {
        "n": int(measured.size),
        "mape": mape(measured, predicted),
        "acc10": accuracy_within(measured, predicted, 0.10),
        "median_error": float(100 * np.median(e)),
        "min_error": float(100 * e.min()),
        "max_error": float(100 * e.max()),
    }


def ref_score(records: list[dict]) -> float | None:
    """Median reference-kernel score (GFLOP/s) the profiler recorded: an independent speed gauge."""
    scores = [r.get("fingerprint", {}).get("ref_score") for r in records]
    scores = [s for s in scores if s]
    return float(np.median(scores)) if scores else None


def later_run(predictor, fit_records: list[dict], store: Path, precision: str = "fp32") -> dict | None:
    from compressor.core.workload import Workload
    from compressor.elastic.search_space import SubNetwork
    from predictors.calibration import calibrate
    from predictors.dataset import read_store

    group, sha = predictor.group, predictor.manifest["model"].get("sha256")
    records = [
        r
        for r in read_store(store)
        if all(str(r[k]) == str(v) for k, v in group.items()) and r["model"].get("sha256") == sha
    ]
    if not records:
        print(f"{store}: no {precision} records of the predictor's group and model; skipped")
        return None
    anchor = SubNetwork.from_dict(predictor.manifest["anchor"]["arch"])
    fit_by = {(SubNetwork.from_dict(r["arch"]), r["workload"]): r for r in fit_records}
    out = {
        "store": str(store),
        "precision": precision,
        "created": [min(r["created_at"] for r in records), max(r["created_at"] for r in records)],
    }
    rows: dict = {}
    for w in sorted({r["workload"] for r in records}):
        rs = [r for r in records if r["workload"] == w]
        now = [r for r in rs if SubNetwork.from_dict(r["arch"]) == anchor]
        if not now:
            raise SystemExit(f"{store}: the anchor {anchor} was not profiled on {w}; profile it there too")
        # one anchor (the first, as predictors calibrated before session 11), and the product's k anchors:
        # those of the predictor's anchors this run profiled too, their median ratio
        by_sub = {SubNetwork.from_dict(r["arch"]): float(r["stats_ms"]["median"]) for r in rs}
        first = {k: v for k, v in predictor.manifest.items() if k != "anchors"}
        c = calibrate(type(predictor)(predictor.estimators, first, predictor.space), [w], lambda s, wl, m=by_sub: m[s])
        c = c.calibrations[w]
        present = [a for a in predictor.manifest.get("anchors", []) if SubNetwork.from_dict(a["arch"]) in by_sub]
        several = type(predictor)(predictor.estimators, {**predictor.manifest, "anchors": present}, predictor.space)
        ck = calibrate(several, [w], lambda s, wl, m=by_sub: m[s]).calibrations[w]
        repeats = [r for r in rs if (SubNetwork.from_dict(r["arch"]), w) in fit_by and r is not now[0]]
        held = [r for r in rs if (SubNetwork.from_dict(r["arch"]), w) not in fit_by]
        subs = [SubNetwork.from_dict(r["arch"]) for r in held]
        wl = Workload.parse(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = predictor.predict_ms(subs, wl) if subs else np.zeros(0)
        measured = np.array([float(r["stats_ms"]["median"]) for r in held])
        inside = np.array([not predictor.out_of_range([s], wl) for s in subs], dtype=bool)
        split = {"inside": inside, "outside": ~inside, "all": np.ones(len(held), dtype=bool)}
        # design alternatives, from the same data: the anchor's fit-time value taken from the predictor
        # (smoothed, no fit-time timing noise) instead of its record; and k anchors (every sub-network
        # of the fit run re-measured in this run, the median ratio), which averages the anchor's noise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            anchor_pred = float(predictor.predict_ms([anchor], wl)[0])
        f_pred = c.now_ms / anchor_pred
        ratios = [
            float(r["stats_ms"]["median"]) / float(fit_by[(SubNetwork.from_dict(r["arch"]), w)]["stats_ms"]["median"])
            for r in repeats + [now[0]]
        ]
        f_multi = float(np.median(ratios))
        rows[w] = {
            "anchor": {"fit_ms": c.fit_ms, "now_ms": c.now_ms, "factor": c.factor, "predicted_fit_ms": anchor_pred},
            "factors": {
                "anchor_measured": c.factor,
                "anchor_predicted": f_pred,
                f"median_of_{len(ratios)}": f_multi,
                "anchors": ck.factor,
            },
            "anchors": list(ck.anchors),
            "ref_score": {"fit": ref_score(fit_records), "later": ref_score(rs)},
            "pure_drift": [
                {
                    "arch": r["arch"],
                    "ratio": float(r["stats_ms"]["median"])
                    / float(fit_by[(SubNetwork.from_dict(r["arch"]), w)]["stats_ms"]["median"]),
                }
                for r in repeats
            ],
            "held_out": {
                name: {
                    "uncalibrated": score(measured[mask], raw[mask]),
                    "calibrated": score(measured[mask], raw[mask] * c.factor),
                    "calibrated_anchor_predicted": score(measured[mask], raw[mask] * f_pred),
                    f"calibrated_median_of_{len(ratios)}": score(measured[mask], raw[mask] * f_multi),
                    "calibrated_anchors": score(measured[mask], raw[mask] * ck.factor),
                }
                for name, mask in split.items()
            },
            "points": [
                {
                    "arch": r["arch"],
                    "inside": bool(i),
                    "measured_ms": float(m),
                    "predicted_ms": float(p),
                    "calibrated_ms": float(p * c.factor),
                    "reasons": predictor.out_of_range([s], wl),
                }
                for r, s, i, m, p in zip(held, subs, inside, measured, raw)
            ],
        }
    out["workloads"] = rows
    return out


def markdown(runs: list[dict]) -> str:
    lines = [
        "| other run (UTC) | precision | workload | anchor factor | held-out | n | MAPE raw | MAPE cal | ±10% raw "
        "| ±10% cal | median err raw | median err cal |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        when = f"{run['created'][0][11:16]}-{run['created'][1][11:16]}"
        prec = run.get("precision", "fp32")
        for w, row in run["workloads"].items():
            for name, s in row["held_out"].items():
                u, c = s["uncalibrated"], s["calibrated"]
                if not u["n"]:
                    continue
                lines.append(
                    f"| {when} | {prec} | {w} | x{row['anchor']['factor']:.3f} | {name} | {u['n']} | "
                    f"{u['mape']:.1f}% | {c['mape']:.1f}% | {u['acc10']:.0%} | {c['acc10']:.0%} | "
                    f"{u['median_error']:+.1f}% | {c['median_error']:+.1f}% |"
                )
    lines += [
        "",
        "| other run | precision | workload | held-out | MAPE: raw / 1 anchor / anchor predicted at fit / "
        "median of k repeats / stored anchors | ±10%: raw / 1 anchor / predicted / median of k / anchors |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        when = f"{run['created'][0][11:16]}-{run['created'][1][11:16]}"
        prec = run.get("precision", "fp32")
        for w, row in run["workloads"].items():
            s = row["held_out"]["all"]
            multi = next(k for k in s if k.startswith("calibrated_median_of_"))
            keys = ("uncalibrated", "calibrated", "calibrated_anchor_predicted", multi, "calibrated_anchors")
            keys = tuple(k for k in keys if k in s)  # JSON written before stored anchors had no last column
            if not s["uncalibrated"]["n"]:
                continue
            lines.append(
                f"| {when} | {prec} | {w} | all ({s['uncalibrated']['n']}; k={multi.rsplit('_', 1)[1]}; "
                f"{len(row.get('anchors', []))} anchors) | "
                + " / ".join(f"{s[k]['mape']:.1f}%" for k in keys)
                + " | "
                + " / ".join(f"{s[k]['acc10']:.0%}" for k in keys)
                + " |"
            )
    return "\n".join(lines)


def fit_for(fit_store: Path, model: str, precision: str, folds: int, reference=None, anchors: int = 1):
    """The predictor ``compress`` would fit on ``fit_store``'s records of ``precision`` (with ``reference``)."""
    from predictors.dataset import read_store, select_group
    from predictors.fit import FitConfig, fit_predictor
    from predictors.modelspace import describe_model

    records = select_group(read_store(fit_store), precision=precision)
    config = FitConfig(folds=folds, anchors=anchors)
    return fit_predictor(records, describe_model(model), config, reference=reference).predictor, records


def main(argv=None) -> int:
    args = parse_args(argv)
    from compressor.elastic.modeldir import write_json_atomic
    from predictors import load_predictor

    # checked itself when asked for, and the reference of every quantized one either way
    fp32 = fit_for(args.fit_store, args.model, "fp32", args.folds, anchors=args.anchors)
    results, runs = [], []
    for precision in args.precision:
        if precision == "fp32":
            predictor, fit_records = fp32
        else:
            predictor, fit_records = fit_for(
                args.fit_store, args.model, precision, args.folds, reference=fp32[0], anchors=args.anchors
            )
        check = None
        if precision == "fp32" and args.compare_predictor and (args.compare_predictor / "manifest.json").is_file():
            from compressor.core.workload import Workload
            from compressor.elastic.search_space import SubNetwork

            demo = load_predictor(args.compare_predictor)
            subs = [SubNetwork.from_dict(r["arch"]) for r in fit_records]
            w = Workload.parse(fit_records[0]["workload"])
            check = float(np.max(np.abs(demo.predict_ms(subs, w) / predictor.predict_ms(subs, w) - 1)))
            print(f"re-fitted predictor vs {args.compare_predictor}: max relative difference {check:.2e}")
        mine = [later_run(predictor, fit_records, s, precision) for s in args.later]
        mine = [r for r in mine if r is not None]
        runs += mine
        selected = predictor.manifest["cv"]["selected"]
        results.append(
            {
                "precision": precision,
                "fit_created": [min(r["created_at"] for r in fit_records), max(r["created_at"] for r in fit_records)],
                "fit_subnetworks": predictor.manifest["training"]["n_subnetworks"],
                "predictor": selected,
                "cv": predictor.manifest["cv"]["models"][selected],
                "anchor": predictor.manifest["anchor"],
                "anchors": predictor.manifest.get("anchors"),
                "refit_vs_demo_max_rel_diff": check,
                "later_runs": mine,
            }
        )
    table = markdown(runs)
    print(table)
    for run in runs:
        for w, row in run["workloads"].items():
            drift = ", ".join(f"{d['ratio']:.3f}" for d in row["pure_drift"]) or "-"
            print(
                f"{run['store']} {run['precision']} {w}: anchor {row['anchor']['now_ms']:.1f} ms now vs "
                f"{row['anchor']['fit_ms']:.1f} ms at fit; other repeats later/fit: {drift}; reference score fit "
                f"{row['ref_score']['fit']} later {row['ref_score']['later']} GFLOP/s"
            )
    first = results[0]
    write_json_atomic(
        args.out,
        {
            "fit_store": str(args.fit_store),
            # the first precision's fit, flat, as before --precision existed
            **{k: first[k] for k in ("fit_created", "predictor", "cv", "anchor", "refit_vs_demo_max_rel_diff")},
            "later_runs": first["later_runs"],
            "precisions": results,
            "table_markdown": table,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
