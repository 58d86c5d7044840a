"""Reliability of the CI latency gate on real ONNX Runtime CPU timings.

Measures one bundle ``--repeats`` times (each a full gate measurement: interleaved blocks of the
bundle and the reference kernel, under the profilers' machine lock). Consecutive measurements
form A/A comparisons (false-alarm rate). Slowdowns of 10% and 20% are *injected* by scaling the
current side's real samples (so the noise is real, the effect size is known exactly). Prints a
table and writes benchmarks/results/gate_reliability.json.

    python benchmarks/gate_reliability.py --bundle runs/demo/bundles/0-... [--repeats 51]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from compressor.workload import Workload
from deploy.measure import measure_blocks
from deploy.regression import GateConfig, Measurement, compare


def scaled(m: Measurement, factor: float) -> Measurement:
    return Measurement([[x * factor for x in b] for b in m.blocks], list(m.reference_ms), dict(m.identity))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--repeats", type=int, default=51)
    ap.add_argument("--workload", default="prefill:1x64")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gate_reliability.json"))
    args = ap.parse_args()
    w = Workload.parse(args.workload)
    cfg = GateConfig()
    ms, t0 = [], time.perf_counter()
    for i in range(args.repeats):
        ms.append(measure_blocks(Path(args.bundle), w, blocks=args.blocks, iters_per_block=args.iters))
        print(f"measurement {i + 1}/{args.repeats}", end="\r", flush=True)
    pairs = list(zip(ms[1:], ms[:-1]))
    rows = {}
    for label, factor in (("A/A", 1.0), ("+10%", 1.10), ("+20%", 1.20)):
        verdicts = [compare(scaled(cur, factor), base, cfg) for cur, base in pairs]
        flagged = sum(v.exit_code == 1 for v in verdicts)
        rows[label] = {"comparisons": len(verdicts), "flagged": flagged, "rate": flagged / len(verdicts),
                       "median_ratio": sorted(v.ratio for v in verdicts)[len(verdicts) // 2]}
    print(f"\n{'case':<6} {'comparisons':>12} {'flagged':>8} {'rate':>7} {'median ratio':>13}")
    for label, r in rows.items():
        print(f"{label:<6} {r['comparisons']:>12} {r['flagged']:>8} {r['rate']:>7.1%} {r['median_ratio']:>13.3f}")
    raw_medians = [sorted(x for b in m.blocks for x in b)[len(m.blocks) * args.iters // 2] for m in ms]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": vars(args), "gate": cfg.__dict__, "results": rows,
                                          "raw_medians_ms": raw_medians, "seconds": time.perf_counter() - t0}, indent=2))


if __name__ == "__main__":
    main()
