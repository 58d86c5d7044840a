"""Quantization recipes on SmolLM2-135M: quality through the engine, the search's torch simulation of
it, and prefill latency, for the original and pruned sub-networks.

For each model (by default the original and the refined pruned models of the last ``make demo``:
``runs/demo/importance`` and ``runs/demo/refined/*``; any nasprune/HF model dirs with ``--models``)
and each precision (fp32 and every recipe of ``compressor.quant.quantize``):

* test perplexity through ONNX Runtime running the quantized full-logits graph
  (``compressor.quant.engine_quality``) on Persuasion (never seen by calibration or training);
* the same perplexity from the super-network forward with the recipe simulated
  (``compressor.elastic.quant_sim``), the number the search optimizes; the relative gap is the
  simulation's error;
* median prefill latency (``prefill:1x128``, 1 thread) of the quantized *prefill* graph, all
  precisions of one model timed round-robin in the same rounds, so their ratios to fp32 cancel the
  machine's slow drift.

Static recipes (``int8-static*``) are calibrated on ``--calibration`` (the demo's calibration text,
16 x 128 tokens; engine and simulation on the same windows), never on the test text.

    python benchmarks/quantization.py [--models DIR,DIR] [--tokens 2048] [--rounds 5]

Prints a table and writes benchmarks/results/quantization.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from compressor.core.data import read_source, resolve_data
from compressor.core.precisions import RECIPES, needs_calibration
from compressor.elastic.evaluate import mean_loss, token_windows
from compressor.elastic.extract import extract
from compressor.elastic.modeldir import load_model, now
from compressor.elastic.quant_sim import simulate
from compressor.quant.engine_quality import graph_mean_loss
from compressor.quant.onnx_export import ExportRecipe, cpu_session, export_graphs
from compressor.quant.quantize import StaticCalibration, calibration_windows, quantize_graph_dir
from profilers.standalone import load_average


def time_prefill(sessions: dict, ids: np.ndarray, rounds: int, iters: int) -> dict[str, list[float]]:
    """Median ms per round for every session, the sessions interleaved within each round."""
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    out = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = []
            for _ in range(iters):
                a = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - a)
            out[k].append(1000 * statistics.median(t))
    return out


def demo_models() -> list[str]:
    """The original (importance-permuted: same function) and the refined points of the last make demo."""
    run = Path("runs/demo")
    if not (run / "importance").is_dir():
        raise SystemExit("error: runs/demo/importance does not exist; run `make demo` first or pass --models")
    refined = sorted(str(p) for p in (run / "refined").iterdir() if "." not in p.name and (p / "config.json").is_file())
    return [str(run / "importance"), *refined]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=None, help="comma-separated model dirs (default: the last make demo's)")
    ap.add_argument("--precisions", default=",".join(["fp32", *RECIPES]))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calibration", default="builtin:northanger_abbey", help="text static recipes calibrate on")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantization.json"))
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    precisions = args.precisions.split(",")
    models = args.models.split(",") if args.models else demo_models()
    rows, load_start = [], load_average()
    windows = None
    for directory in models:
        loaded = load_model(directory)
        sn = loaded.supernet().eval()
        if windows is None:
            _, text = read_source(resolve_data("builtin:persuasion_heldout"))
            windows = token_windows(loaded.tokenizer, text, args.seq_len, args.tokens)
            ids = windows[:1].numpy().astype(np.int64)
            calib = calibration_windows(loaded.tokenizer, args.calibration)
        sub = sn.space.largest()
        model = extract(sn, sub).eval()
        print(f"{directory}: {sub} ({sn.space.num_params(sub) / 1e6:.1f}M)", flush=True)
        with tempfile.TemporaryDirectory(prefix="nasprune-quant-") as tmp:
            base = Path(tmp) / "fp32"
            export_graphs(model, base, ExportRecipe(), graphs=("prefill", "logits"))
            graphs, seconds = {"fp32": {g: base / g / "model.onnx" for g in ("prefill", "logits")}}, {}
            for p in precisions:
                if p == "fp32":
                    continue
                t = time.perf_counter()
                cal = StaticCalibration(calib.numpy(), args.calibration) if needs_calibration(p) else None
                graphs[p] = quantize_graph_dir(base, Path(tmp) / p, p, ("prefill", "logits"), cal)
                seconds[p] = time.perf_counter() - t
            timing = time_prefill(
                {p: cpu_session(graphs[p]["prefill"], threads=1) for p in precisions}, ids, args.rounds, args.iters
            )
            for p in precisions:
                engine, tokens = graph_mean_loss(graphs[p]["logits"], windows, threads=1)
                with (
                    torch.no_grad(),
                    sn.selected(sub),
                    simulate(p, sn.model, lambda sn=sn, c=calib: mean_loss(sn, c, 4)),
                ):
                    sim = mean_loss(sn, windows, 1)
                ratios = [a / b for a, b in zip(timing[p], timing["fp32"])]
                row = {
                    "model": directory,
                    "arch": sub.to_dict(),
                    "params": sn.space.num_params(sub),
                    "precision": p,
                    "ppl_engine": math.exp(engine),
                    "ppl_sim": math.exp(sim),
                    "sim_error": math.exp(sim) / math.exp(engine) - 1,
                    "prefill_ms": statistics.median(timing[p]),
                    "latency_vs_fp32": statistics.median(ratios),
                    "quantize_seconds": seconds.get(p, 0.0),
                    "tokens": tokens,
                }
                rows.append(row)
                print(
                    f"  {p:<10} ppl {row['ppl_engine']:8.2f} (sim {row['ppl_sim']:8.2f}, {row['sim_error']:+.1%})"
                    f"  prefill {row['prefill_ms']:6.1f} ms  x{row['latency_vs_fp32']:.2f} of fp32",
                    flush=True,
                )
    original = rows[0]["ppl_engine"] if rows else None  # the first model's fp32: the original by default
    print("\n| params | precision | test ppl (engine) | x original fp32 | sim error | prefill ms | x fp32 latency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['ppl_engine'] / original:.2f}" if original else "–"
        print(
            f"| {r['params'] / 1e6:.1f}M | {r['precision']} | {r['ppl_engine']:.2f} | {rel} | {r['sim_error']:+.1%} "
            f"| {r['prefill_ms']:.1f} | {r['latency_vs_fp32']:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "created_at": now(),
                "test": "builtin:persuasion_heldout",
                "tokens": int(windows.numel()),
                "seq_len": args.seq_len,
                "workload": f"prefill:1x{args.seq_len}",
                "threads": 1,
                "rounds": args.rounds,
                "load_average": [load_start, load_average()],
                "recipes": {k: v.to_dict() for k, v in RECIPES.items()},
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
