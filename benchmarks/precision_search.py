"""Does searching the precision too find a better front than searching one precision?

On the super-network and the per-precision predictors of a ``compress`` run (default: the last
``make demo``), NSGA-II runs with the same budget (population x generations, seeds) three ways:
fp32 only, each quantized precision alone, and all of them with the precision gene. Every front is
scored by hypervolume against one shared reference point (the mixed search's: the worst
validation loss over the precisions, the slowest largest sub-network), on the search's own
objectives (validation loss with the recipe simulated, predicted latency). The quality oracle is
shared, so a (sub-network, precision) pair is evaluated once across all searches.

    python benchmarks/precision_search.py [--run runs/demo] [--seeds 0,1] [--population 12 --generations 6]

Prints a table and writes benchmarks/results/precision_search.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from compressor.core.data import read_source, resolve_data
from compressor.core.workload import Workload
from compressor.elastic.evaluate import token_windows
from compressor.elastic.modeldir import load_model, now
from predictors import load_predictor
from search.problem import QualityOracle, SearchConfig, hypervolume, reference_point, run_nsga2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workload", default="prefill:1x128")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision_search.json"))
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    run = Path(args.run)
    dirs = sorted(p for p in run.iterdir() if p.name == "predictor" or p.name.startswith("predictor-"))
    predictors = {}
    for d in dirs:
        pred = load_predictor(d)
        predictors[pred.group["precision"]] = pred
    if len(predictors) < 2:
        raise SystemExit(f"error: {run} has predictors for {sorted(predictors)} only; profile two precisions")
    loaded = load_model(str(run / "supernet"))
    config = json.loads((run / "run.json").read_text())["config"]
    _, text = read_source(resolve_data(config["data"]["validation"]))
    windows = token_windows(loaded.tokenizer, text, args.seq_len, args.eval_tokens)
    sn = loaded.supernet()
    quality = QualityOracle(sn, windows)
    w = Workload.parse(args.workload)

    def latency(subs, precision):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return predictors[precision].predict_ms(subs, w)

    precisions = list(predictors)
    ways = {p: [p] for p in precisions} | {"+".join(precisions) + " (gene)": precisions}
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        mixed = SearchConfig(args.population, args.generations, seed=seed, precisions=precisions)
        ref = reference_point(sn.space, quality, latency, mixed)
        for name, precs in ways.items():
            cfg = SearchConfig(args.population, args.generations, seed=seed, precisions=precs)
            t = time.perf_counter()
            result = run_nsga2(sn.space, quality, latency, cfg, progress=False)
            hv = hypervolume(result.evaluated, ref, mixed)
            rows.append(
                {
                    "seed": seed,
                    "search": name,
                    "hypervolume": hv,
                    "front_points": len(result.pareto),
                    "front_precisions": sorted({p.precision for p in result.pareto}),
                    "evaluated": len(result.evaluated),
                    "seconds": time.perf_counter() - t,
                }
            )
            print(f"seed {seed} {name:<22} HV {hv:9.2f}  front {len(result.pareto):2d}", flush=True)
    print("\n| search | mean hypervolume | vs best single precision | seeds |")
    print("|---|---|---|---|")
    means = {n: float(np.mean([r["hypervolume"] for r in rows if r["search"] == n])) for n in ways}
    best_single = max(means[p] for p in precisions)
    for n, m in means.items():
        print(f"| {n} | {m:.2f} | {m / best_single:.3f}x | {args.seeds} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "created_at": now(),
                "run": str(run),
                "workload": str(w),
                "population": args.population,
                "generations": args.generations,
                "eval_tokens": int(windows.numel()),
                "rows": rows,
                "mean_hypervolume": means,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
