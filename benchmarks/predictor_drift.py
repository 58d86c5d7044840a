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
    p.add_argument("--out", type=Path, default=RESULTS / "predictor_drift.json")
    args = p.parse_args(argv)
    args.later = args.later or [RESULTS / "predictor_accuracy_eval.sqlite"]
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


def later_run(predictor, fit_records: list[dict], store: Path) -> dict:
    from compressor.search_space import SubNetwork
    from compressor.workload import Workload
    from predictors.calibration import calibrate
    from predictors.dataset import read_store

    group, sha = predictor.group, predictor.manifest["model"].get("sha256")
    records = [
        r
        for r in read_store(store)
        if all(str(r[k]) == str(v) for k, v in group.items()) and r["model"].get("sha256") == sha
    ]
    if not records:
        raise SystemExit(f"{store}: no records of the predictor's group and model")
    anchor = SubNetwork.from_dict(predictor.manifest["anchor"]["arch"])
    fit_by = {(SubNetwork.from_dict(r["arch"]), r["workload"]): r for r in fit_records}
    out = {
        "store": str(store),
        "created": [min(r["created_at"] for r in records), max(r["created_at"] for r in records)],
    }
    rows: dict = {}
    for w in sorted({r["workload"] for r in records}):
        rs = [r for r in records if r["workload"] == w]
        now = [r for r in rs if SubNetwork.from_dict(r["arch"]) == anchor]
        if not now:
            raise SystemExit(f"{store}: the anchor {anchor} was not profiled on {w}; profile it there too")
        cal = calibrate(predictor, [w], lambda sub, wl, m=now[0]["stats_ms"]["median"]: float(m))
        c = cal.calibrations[w]
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
            "factors": {"anchor_measured": c.factor, "anchor_predicted": f_pred, f"median_of_{len(ratios)}": f_multi},
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
        "| other run (UTC) | workload | anchor factor | held-out | n | MAPE raw | MAPE cal | ±10% raw | ±10% cal "
        "| median err raw | median err cal |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        when = f"{run['created'][0][11:16]}-{run['created'][1][11:16]}"
        for w, row in run["workloads"].items():
            for name, s in row["held_out"].items():
                u, c = s["uncalibrated"], s["calibrated"]
                if not u["n"]:
                    continue
                lines.append(
                    f"| {when} | {w} | x{row['anchor']['factor']:.3f} | {name} | {u['n']} | {u['mape']:.1f}% | "
                    f"{c['mape']:.1f}% | {u['acc10']:.0%} | {c['acc10']:.0%} | {u['median_error']:+.1f}% | "
                    f"{c['median_error']:+.1f}% |"
                )
    lines += [
        "",
        "| other run | workload | held-out | MAPE: raw / 1 anchor / anchor predicted at fit / median of k | "
        "±10%: raw / 1 anchor / predicted / median of k |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        when = f"{run['created'][0][11:16]}-{run['created'][1][11:16]}"
        for w, row in run["workloads"].items():
            s = row["held_out"]["all"]
            multi = next(k for k in s if k.startswith("calibrated_median_of_"))
            keys = ("uncalibrated", "calibrated", "calibrated_anchor_predicted", multi)
            if not s["uncalibrated"]["n"]:
                continue
            lines.append(
                f"| {when} | {w} | all ({s['uncalibrated']['n']}; k={multi.rsplit('_', 1)[1]}) | "
                + " / ".join(f"{s[k]['mape']:.1f}%" for k in keys)
                + " | "
                + " / ".join(f"{s[k]['acc10']:.0%}" for k in keys)
                + " |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from compressor.modeldir import write_json_atomic
    from predictors import load_predictor
    from predictors.dataset import read_store, select_group
    from predictors.fit import FitConfig, fit_predictor
    from predictors.modelspace import describe_model

    fit_records = select_group(read_store(args.fit_store))
    predictor = fit_predictor(fit_records, describe_model(args.model), FitConfig(folds=args.folds)).predictor
    check = None
    if args.compare_predictor and (args.compare_predictor / "manifest.json").is_file():
        from compressor.search_space import SubNetwork
        from compressor.workload import Workload

        demo = load_predictor(args.compare_predictor)
        subs = [SubNetwork.from_dict(r["arch"]) for r in fit_records]
        w = Workload.parse(fit_records[0]["workload"])
        check = float(np.max(np.abs(demo.predict_ms(subs, w) / predictor.predict_ms(subs, w) - 1)))
        print(f"re-fitted predictor vs {args.compare_predictor}: max relative difference {check:.2e}")
    runs = [later_run(predictor, fit_records, s) for s in args.later]
    table = markdown(runs)
    print(table)
    for run in runs:
        for w, row in run["workloads"].items():
            drift = ", ".join(f"{d['ratio']:.3f}" for d in row["pure_drift"]) or "-"
            print(
                f"{run['store']} {w}: anchor {row['anchor']['now_ms']:.1f} ms now vs {row['anchor']['fit_ms']:.1f} ms "
                f"at fit; other repeats later/fit: {drift}; reference score fit {row['ref_score']['fit']} "
                f"later {row['ref_score']['later']} GFLOP/s"
            )
    fit_when = [min(r["created_at"] for r in fit_records), max(r["created_at"] for r in fit_records)]
    write_json_atomic(
        args.out,
        {
            "fit_store": str(args.fit_store),
            "fit_created": fit_when,
            "predictor": predictor.manifest["cv"]["selected"],
            "cv": predictor.manifest["cv"]["models"][predictor.manifest["cv"]["selected"]],
            "anchor": predictor.manifest["anchor"],
            "refit_vs_demo_max_rel_diff": check,
            "later_runs": runs,
            "table_markdown": table,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
