"""Prefill latency of extracted SmolLM2 sub-networks (~100/75/50/25% params) vs the full model.

torch CPU, batch 1 x 128 tokens, fixed intra-op threads, median of repeated runs. All models are
timed in one process, interleaved round-robin, so machine noise hits every model alike and the
ratios stay comparable. Prints a table and writes benchmarks/results/extract_speed.json.

    python benchmarks/extract_speed.py [--threads 1] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from compressor.elastic.extract import extract
from compressor.elastic.modeldir import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "extract_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("default")
    sn = loaded.supernet()
    space = sn.space
    full = space.num_params(space.largest())
    models = {}
    for frac in (1.0, 0.75, 0.5, 0.25):
        sub = space.largest() if frac == 1.0 else space.balanced_at(frac)
        models[frac] = (sub, extract(sn, sub))
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, args.seq))
    times = {f: [] for f in models}
    with torch.inference_mode():
        for _, m in models.values():  # warm-up
            for _ in range(3):
                m(input_ids=ids, use_cache=False)
        for _ in range(args.rounds):
            for f, (_, m) in models.items():
                t = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                times[f].append((time.perf_counter() - t) * 1e3)
    base = statistics.median(times[1.0])
    rows = []
    print(f"{'target':>6} {'sub-network':<22} {'params':>12} {'p/full':>7} {'median ms':>10} {'ratio':>6}")
    for f, (sub, _) in models.items():
        med = statistics.median(times[f])
        p = space.num_params(sub)
        rows.append(
            {
                "target_fraction": f,
                "arch": sub.to_dict(),
                "params": p,
                "param_ratio": p / full,
                "median_ms": med,
                "latency_ratio": med / base,
                "samples_ms": times[f],
            }
        )
        print(f"{f:>6.2f} {str(sub):<22} {p:>12,} {p / full:>7.2f} {med:>10.1f} {med / base:>6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "workload": f"prefill:1x{args.seq}",
                "engine": "torch-cpu",
                "threads": args.threads,
                "rounds": args.rounds,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
