"""How well does the sum of per-block "replace one block" scores rank sub-networks?

On the real SmolLM2-135M (importance-permuted, drop-loss layer deltas from the importance stage):
block scores (:mod:`compressor.recovery.block_scores`) are computed on ``--score-tokens`` validation tokens,
then ``--subnets`` random sub-networks (uniform over the search space's genes) are evaluated through
the super-network on ``--eval-tokens`` validation tokens. Reported: Kendall tau and Spearman rho
between the additive proxy and the measured loss, next to the trivial baseline "fewer parameters =
worse" (a proxy worth using must beat it), and the same on the sub-networks that keep every layer
(width only, where the proxy needs no importance deltas). Prints a table; writes
``benchmarks/results/block_scores.json``.

    python benchmarks/block_scores.py [--model runs/demo/importance] [--subnets 32]

Without ``--model`` it uses ``runs/demo/importance`` (from ``make demo``) when present, else runs
the importance stage in memory (8,192 calibration tokens, drop-loss layers on 512).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from compressor.core.data import PACKAGE_DATA, load_data
from compressor.elastic.evaluate import mean_loss, token_windows
from compressor.elastic.modeldir import load_model
from compressor.recovery.block_scores import BlockScoreConfig, compute_block_scores, estimate_loss, layer_drop_deltas

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def permuted_model(spec: str | None):
    if spec is None and (ROOT / "runs" / "demo" / "importance" / "nasprune.json").exists():
        spec = str(ROOT / "runs" / "demo" / "importance")
    if spec is not None:
        loaded = load_model(spec)
        if layer_drop_deltas(loaded.meta) is None:
            print(f"note: {spec} has no drop-loss layer deltas: depth is not covered by the proxy")
        return loaded, spec
    from compressor.elastic.importance import compute_importance, layer_ranking, permute

    loaded = load_model("default")
    calib = load_data(loaded.tokenizer, str(PACKAGE_DATA / "northanger_abbey.txt"), 512, 8192)
    sn = loaded.supernet()
    scores = compute_importance(sn, calib, calib.subset(slice(0, 1)), "drop-loss", 8, progress=False)
    ranking = layer_ranking(scores)
    permute(sn, scores)
    loaded.meta.layer_ranking = ranking
    loaded.meta.importance = {**scores.info, "layer_scores": [float(x) for x in scores.layers]}
    return loaded, "default + importance in memory (8192 tokens, drop-loss on 512)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--validation", default=str(PACKAGE_DATA / "sense_and_sensibility_validation.txt"))
    ap.add_argument("--score-tokens", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--heads", default="3,6")
    ap.add_argument("--ffn", default="384,960")
    ap.add_argument("--embed", default="288,432")
    ap.add_argument("--subnets", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded, model_name = permuted_model(args.model)
    sn = loaded.supernet()
    text = Path(args.validation).read_text()
    windows = token_windows(loaded.tokenizer, text, args.seq_len, max(args.score_tokens, args.eval_tokens))
    score_windows = windows[: args.score_tokens // args.seq_len]
    eval_windows = windows[: args.eval_tokens // args.seq_len]
    widths = {k: tuple(int(v) for v in getattr(args, k).split(",")) for k in ("heads", "ffn", "embed")}
    cfg = BlockScoreConfig(
        tokens=args.score_tokens,
        seq_len=args.seq_len,
        num_heads=widths["heads"],
        ffn_dim=widths["ffn"],
        embed_dim=widths["embed"],
    )
    t = time.perf_counter()
    scores = compute_block_scores(sn, score_windows, cfg, log=print)
    score_seconds = time.perf_counter() - t
    print(f"block scores in {score_seconds:.0f}s (base loss {scores['base_loss']:.4f})")
    deltas = layer_drop_deltas(loaded.meta)
    rng = np.random.default_rng(args.seed)
    rows = []
    t = time.perf_counter()
    seen = set()
    while len(rows) < args.subnets:
        sub = sn.space.sample(rng)
        if str(sub) in seen:
            continue
        seen.add(str(sub))
        with sn.selected(sub):
            measured = mean_loss(sn, eval_windows)
        est = estimate_loss(scores, sn.space, sub, deltas)
        rows.append(
            {
                "arch": sub.to_dict(),
                "params": sn.space.num_params(sub),
                "measured_loss": measured,
                "proxy_loss": est["loss"],
                "not_covered": est["not_covered"],
            }
        )
        print(f"  {sub}: measured {measured:.3f}, proxy {est['loss']:.3f}")
    eval_seconds = time.perf_counter() - t

    def corr(sel, key, sign=1.0):
        m = [r["measured_loss"] for r in sel]
        p = [sign * r[key] for r in sel]
        return {"n": len(sel), "kendall_tau": float(kendalltau(p, m)[0]), "spearman": float(spearmanr(p, m)[0])}

    full_depth = [r for r in rows if r["arch"]["num_layers"] == sn.space.choices["num_layers"][-1]]
    result = {
        "model": model_name,
        "validation": args.validation,
        "conditions": f"{os.cpu_count()}-core CPU, {args.threads} threads, load average at the end "
        f"{os.getloadavg()[0]:.1f} (other jobs share the machine: seconds are wall time under that load)",
        "score_tokens": int(score_windows.numel()),
        "eval_tokens": int(eval_windows.numel()),
        "seq_len": args.seq_len,
        "widths": scores["widths"],
        "score_seconds": score_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - start,
        "depth_covered": deltas is not None,
        "all": {"proxy": corr(rows, "proxy_loss"), "minus_params": corr(rows, "params", -1.0)},
        "full_depth": (
            {"proxy": corr(full_depth, "proxy_loss"), "minus_params": corr(full_depth, "params", -1.0)}
            if len(full_depth) >= 3
            else None
        ),
        "scores": scores,
        "subnetworks": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / f".block_scores.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS / "block_scores.json")
    print("\n| set | n | proxy tau | proxy rho | -params tau | -params rho |\n|---|---|---|---|---|---|")
    for name in ("all", "full_depth"):
        r = result[name]
        if r:
            print(
                f"| {name} | {r['proxy']['n']} | {r['proxy']['kendall_tau']:.3f} | {r['proxy']['spearman']:.3f} | "
                f"{r['minus_params']['kendall_tau']:.3f} | {r['minus_params']['spearman']:.3f} |"
            )
    total = result["total_seconds"]
    print(f"scores {score_seconds:.0f}s, {len(rows)} evaluations {eval_seconds:.0f}s, total {total:.0f}s")


if __name__ == "__main__":
    main()
