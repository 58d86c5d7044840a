"""torch eager vs ONNX Runtime (CPU) on five SmolLM2 sub-networks, prefill and decode.

Sub-networks: the largest and the balanced ~75/50/35/25% ones (``SearchSpace.balanced_at``).
Both engines time the same programs (last-position logits + KV cache, ``compressor.quant.onnx_export``
wrappers) under the same protocol, threads and machine lock, through ``profile_subnetworks``, the two
engines interleaved sub-network by sub-network;
ONNX Runtime additionally reports each export's time and parity diffs.

    python benchmarks/engines.py [--threads 1] [--workloads prefill:1x128,decode:1x128] [--max-remeasure 2]

Prints a table and writes benchmarks/results/engines.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from compressor.elastic.modeldir import load_model, now
from profilers.api import profile_subnetworks
from profilers.standalone import Protocol, load_average
from profilers.store import ProfileStore

FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25)
ENGINES = ("torch", "onnxruntime")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", default="prefill:1x128,decode:1x128")
    ap.add_argument(
        "--max-remeasure",
        type=int,
        default=Protocol().max_remeasure,
        help="more attempts per measurement on a shared machine (the least-disturbed one is kept)",
    )
    ap.add_argument("--store", help="keep the measurements in this store (default: a temporary one)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engines.json"))
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    hf_logging.disable_progress_bar()
    loaded = load_model("default")
    space = loaded.supernet().space
    subs = [space.largest() if f == 1.0 else space.balanced_at(f) for f in FRACTIONS]
    load_start = load_average()
    records = {e: [] for e in ENGINES}
    with tempfile.TemporaryDirectory(prefix="nasprune-engines-") as tmp:
        store = ProfileStore(args.store or Path(tmp) / "p.sqlite")
        for sub in subs:  # engines interleaved per sub-network: slow drifts in machine load hit both alike
            for e in ENGINES:
                records[e] += profile_subnetworks(
                    loaded,
                    [sub],
                    workloads,
                    engine=e,
                    store=store,
                    threads=args.threads,
                    progress=True,
                    workdir=tmp,
                    protocol=Protocol(max_remeasure=args.max_remeasure),
                )
    rows = []
    for i, r_ort in enumerate(records["onnxruntime"]):
        r_torch = records["torch"][i]
        assert (r_torch["arch"], r_torch["workload"]) == (r_ort["arch"], r_ort["workload"])
        t, o = r_torch["stats_ms"]["median"], r_ort["stats_ms"]["median"]
        rows.append(
            {
                "arch": r_ort["arch"],
                "sub_network": _name(r_ort["arch"]),
                "params": r_ort["params"],
                "workload": r_ort["workload"],
                "torch_median_ms": t,
                "onnxruntime_median_ms": o,
                "torch_over_onnxruntime": t / o,
                "torch_cv": r_torch["stats_ms"]["cv"],
                "onnxruntime_cv": r_ort["stats_ms"]["cv"],
                "graph_bytes": r_ort["graph_bytes"],
                "export_seconds": r_ort["export"]["seconds"],
                "parity_max_abs_diff": r_ort["export"]["parity_max_abs_diff"],
                "remeasured": {"torch": r_torch["env"]["remeasured"], "onnxruntime": r_ort["env"]["remeasured"]},
            }
        )
    print(f"\n{'sub-network':<20} {'params':>12} {'workload':<14} {'torch ms':>9} {'ORT ms':>8} {'torch/ORT':>9}")
    for r in rows:
        print(
            f"{r['sub_network']:<20} {r['params']:>12,} {r['workload']:<14} {r['torch_median_ms']:>9.1f} "
            f"{r['onnxruntime_median_ms']:>8.1f} {r['torch_over_onnxruntime']:>9.2f}"
        )
    summary = {w: statistics.median(r["torch_over_onnxruntime"] for r in rows if r["workload"] == w) for w in workloads}
    for w, ratio in summary.items():
        print(f"median torch/ORT ratio at {w}: {ratio:.2f}")
    out = {
        "created_at": now(),
        "threads": args.threads,
        "workloads": workloads,
        "fractions": FRACTIONS,
        "protocol": records["onnxruntime"][0]["protocol"],
        "load_average_at_start": load_start,
        "load_average_at_end": load_average(),
        "fingerprint_ids": {e: records[e][0]["fingerprint_id"] for e in ENGINES},
        "recipe_ids": {e: records[e][0]["recipe_id"] for e in ENGINES},
        "median_ratio_torch_over_onnxruntime": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def _name(a: dict) -> str:
    return f"e{a['embed_dim']}-h{a['num_heads']}-f{a['ffn_dim']}-l{a['num_layers']}"


if __name__ == "__main__":
    main()
