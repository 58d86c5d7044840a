"""Reliability of the CI latency gate on real ONNX Runtime CPU timings, in both baseline modes.

* **paired** (``--baseline-bundle``): ``--repeats`` real gate measurements of the bundle against
  itself (two sessions, alternating blocks in one process). Each is an A/A comparison.
* **stored** (``--baseline FILE``): ``--repeats`` independent measurements of the bundle;
  consecutive ones form A/A comparisons (the later is "current", the earlier the stored baseline).

Slowdowns of 10% and 20% are *injected* by scaling the current side's real samples, so the noise
is real and the effect size is known exactly. With ``--slower-bundle`` a genuinely slower bundle
(e.g. the same sub-network with a few more layers) is also checked against the bundle in paired
mode ``--real-repeats`` times: a real regression, end to end. The raw samples are saved
(``results/gate_reliability_raw.json``) so that a change to the decision rule can be re-scored on
the same timings with ``--reanalyze``. Prints a table and writes results/gate_reliability.json.

    python benchmarks/gate_reliability.py --bundle runs/demo/bundles/0-... [--repeats 51]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from compressor.core.workload import Workload
from deploy.measure import measure_blocks, measure_paired
from deploy.regression import GateConfig, Measurement, compare

RESULTS = Path(__file__).parent / "results"
CASES = (("A/A", 1.0), ("+10%", 1.10), ("+20%", 1.20))


def scaled(m: Measurement, factor: float) -> Measurement:
    return Measurement([[x * factor for x in b] for b in m.blocks], list(m.reference_ms), dict(m.identity))


def comparisons(raw: dict) -> dict[str, list[tuple[Measurement, Measurement]]]:
    """(current, baseline) pairs per mode."""
    out = {}
    if raw.get("paired"):
        out["paired"] = [(Measurement.from_dict(c), Measurement.from_dict(b)) for c, b in raw["paired"]]
    if raw.get("real"):
        out["real"] = [(Measurement.from_dict(c), Measurement.from_dict(b)) for c, b in raw["real"]]
    if raw.get("stored"):
        ms = [Measurement.from_dict(d) for d in raw["stored"]]
        out["stored"] = list(zip(ms[1:], ms[:-1]))
    return out


def score(raw: dict, cfg: GateConfig) -> dict:
    rows = {}
    for mode, pairs in comparisons(raw).items():
        for label, factor in CASES if mode != "real" else (("slower bundle", 1.0),):
            verdicts = [compare(scaled(cur, factor), base, cfg) for cur, base in pairs]
            ratios = np.array([v.ratio for v in verdicts])
            flagged = sum(v.exit_code == 1 for v in verdicts)
            rows[f"{mode} {label}"] = {
                "mode": mode,
                "case": label,
                "comparisons": len(verdicts),
                "flagged": flagged,
                "rate": flagged / len(verdicts),
                "median_ratio": float(np.median(ratios)),
                "ratio_p05": float(np.quantile(ratios, 0.05)),
                "ratio_p95": float(np.quantile(ratios, 0.95)),
                "median_ci_width": float(np.median([v.ci_high - v.ci_low for v in verdicts])),
            }
    return rows


def collect(args, raw_path: Path) -> dict:
    """Measure (resumable: the raw file is rewritten atomically after every measurement)."""
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    if raw.get("setup", {}).get("bundle") not in (None, args.bundle):
        raise SystemExit(f"{raw_path} holds measurements of another bundle; move it away first")
    raw["setup"] = {"bundle": args.bundle, "workload": args.workload, "blocks": args.blocks, "iters": args.iters}
    w = Workload.parse(args.workload)
    modes = ["paired", "stored"] if args.mode == "both" else [args.mode]
    t0 = time.perf_counter()
    # Alternate the modes measurement by measurement, so both see the same machine weather.
    for i in range(args.repeats):
        for mode in modes:
            done = raw.setdefault(mode, [])
            if len(done) > i:
                continue
            if mode == "paired":
                cur, base = measure_paired(
                    Path(args.bundle), Path(args.bundle), w, blocks=args.blocks, iters_per_block=args.iters
                )
                done.append([cur.to_dict(), base.to_dict()])
            else:
                done.append(
                    measure_blocks(Path(args.bundle), w, blocks=args.blocks, iters_per_block=args.iters).to_dict()
                )
            tmp = raw_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(raw))
            os.replace(tmp, raw_path)
        print(f"measurement {i + 1}/{args.repeats} ({time.perf_counter() - t0:.0f} s)", end="\r", flush=True)
    if args.slower_bundle:
        raw["setup"]["slower_bundle"] = args.slower_bundle
        done = raw.setdefault("real", [])
        while len(done) < args.real_repeats:
            cur, base = measure_paired(
                Path(args.slower_bundle), Path(args.bundle), w, blocks=args.blocks, iters_per_block=args.iters
            )
            done.append([cur.to_dict(), base.to_dict()])
            tmp = raw_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(raw))
            os.replace(tmp, raw_path)
            print(f"slower bundle {len(done)}/{args.real_repeats}", end="\r", flush=True)
    raw.setdefault("seconds", 0.0)
    raw["seconds"] += time.perf_counter() - t0
    raw_path.write_text(json.dumps(raw))
    return raw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle")
    ap.add_argument("--repeats", type=int, default=51)
    ap.add_argument("--mode", choices=("both", "paired", "stored"), default="both")
    ap.add_argument("--workload", default="prefill:1x64")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--slower-bundle", help="a genuinely slower bundle, checked against --bundle (paired)")
    ap.add_argument("--real-repeats", type=int, default=20)
    ap.add_argument("--raw", default=str(RESULTS / "gate_reliability_raw.json"))
    ap.add_argument("--reanalyze", action="store_true", help="score the saved raw timings only")
    ap.add_argument("--out", default=str(RESULTS / "gate_reliability.json"))
    args = ap.parse_args()
    raw_path = Path(args.raw)
    if args.reanalyze:
        raw = json.loads(raw_path.read_text())
    else:
        if not args.bundle:
            ap.error("--bundle is required unless --reanalyze")
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw = collect(args, raw_path)
    cfg = GateConfig()
    rows = score(raw, cfg)
    print(
        f"\n{'mode':<7} {'case':<13} {'n':>4} {'flagged':>8} {'rate':>7} {'median ratio':>13} "
        f"{'ratio p5..p95':>15} {'CI width':>9}"
    )
    for r in rows.values():
        print(
            f"{r['mode']:<7} {r['case']:<13} {r['comparisons']:>4} {r['flagged']:>8} {r['rate']:>7.1%} "
            f"{r['median_ratio']:>13.3f} {r['ratio_p05']:>7.3f}..{r['ratio_p95']:<7.3f} {r['median_ci_width']:>9.3f}"
        )
    Path(args.out).write_text(
        json.dumps(
            {"setup": raw["setup"], "gate": asdict(cfg), "results": rows, "measure_seconds": raw.get("seconds")},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
