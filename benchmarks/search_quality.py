"""NSGA-II vs random search at equal numbers of evaluated sub-networks (hypervolume, several seeds).

Quality: held-out loss of each sub-network through a super-network (default: the demo run's
trained super-network), on a fixed token budget, cached and *shared* by every run so both
methods pay for the same oracle. Latency: the demo run's predictor. Prints a table and writes
benchmarks/results/search_quality.json.

    python benchmarks/search_quality.py [--run runs/demo] [--seeds 0 1 2] [--population 12] [--generations 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

from compressor.core.workload import Workload
from compressor.elastic.evaluate import PACKAGE_DATA, token_windows
from compressor.elastic.modeldir import load_model
from search.problem import QualityOracle, SearchConfig, hypervolume, reference_point, run_nsga2, run_random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo", help="a compress run dir with supernet/ and predictor/")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--workload", default="prefill:1x128")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_quality.json"))
    args = ap.parse_args()
    run = Path(args.run)
    from predictors import load_predictor

    loaded = load_model(str(run / "supernet"))
    predictor = load_predictor(run / "predictor")
    w = Workload.parse(args.workload)
    windows = token_windows(
        loaded.tokenizer, (PACKAGE_DATA / "persuasion_heldout.txt").read_text(), 256, args.eval_tokens
    )
    sn = loaded.supernet()
    quality = QualityOracle(sn, windows)

    def latency(subs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return predictor.predict_ms(subs, w)

    rows = []
    for seed in args.seeds:
        cfg = SearchConfig(population=args.population, generations=args.generations, seed=seed)
        ref = reference_point(sn.space, quality, latency, cfg)
        ga = run_nsga2(sn.space, quality, latency, cfg, progress=False)
        rnd = run_random(sn.space, quality, latency, cfg, evaluations=len(ga.evaluated))
        row = {
            "seed": seed,
            "evaluations": len(ga.evaluated),
            "hv_nsga2": hypervolume(ga.evaluated, ref, cfg),
            "hv_random": hypervolume(rnd.evaluated, ref, cfg),
            "front_nsga2": len(ga.pareto),
            "front_random": len(rnd.pareto),
            "hv_per_generation_nsga2": ga.hypervolume,
            "hv_per_generation_random": rnd.hypervolume,
        }
        rows.append(row)
        print(
            f"seed {seed}: {row['evaluations']} evaluations  "
            f"HV NSGA-II {row['hv_nsga2']:.4f}  random {row['hv_random']:.4f}"
            f"  ratio {row['hv_nsga2'] / row['hv_random']:.3f}"
        )
    ratios = [r["hv_nsga2"] / r["hv_random"] for r in rows]
    summary = {
        "mean_hv_nsga2": statistics.mean(r["hv_nsga2"] for r in rows),
        "mean_hv_random": statistics.mean(r["hv_random"] for r in rows),
        "mean_ratio": statistics.mean(ratios),
        "nsga2_wins": sum(x > 1 for x in ratios),
        "seeds": len(rows),
        "unique_subnetworks_scored": len(quality.cache),
    }
    print(
        f"mean HV NSGA-II {summary['mean_hv_nsga2']:.4f} vs random {summary['mean_hv_random']:.4f} "
        f"(ratio {summary['mean_ratio']:.3f}; NSGA-II better in {summary['nsga2_wins']}/{len(rows)} seeds)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": vars(args), "summary": summary, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
