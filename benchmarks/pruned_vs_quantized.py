"""Does a pruned, distilled model beat the original model quantized? The user's alternative, head on.

The cheapest thing a user can do with SmolLM2 on a CPU is to quantize the original with ONNX
Runtime. Pruning only pays where a pruned model, shipped at some precision, is at least as good
*and* faster than the original at some precision. This benchmark puts the two side by side, every
number from one run on one machine:

* the original (importance-permuted: the same function) at fp32 and at every ``--precisions``
  recipe, quantized after training (PTQ), as the user would;
* a pruned student already distilled from the original (``--student``: ``nasprune refine``'s
  output, by default ``benchmarks/refine_recipe.py``'s 300-step KD of the 75 % architecture
  576/1280/24) at fp32 and at every recipe, PTQ;
* the same student refined again for each recipe with that recipe simulated in the forward
  (quantization-aware refine, ``nasprune refine --quantization P``, KD from the original; the
  teacher cache is the recovery benchmark's), shipped at that recipe;
* with ``--original-qat``, the unpruned original refined the same way at each recipe: what nasprune
  adds without pruning (the same graph as the PTQ original, so it can only win on quality).

Quality: test perplexity through ONNX Runtime running each model's full-logits graph, quantized
by the recipe it ships in (``compressor.quant.engine_quality``), on Persuasion (held-out Austen: the
training text's domain) and BIG-bench narratives (another domain), never read by training,
calibration or repair. Latency: ``--workloads`` (default ``prefill:1x128`` and
``decode:1x256``, 1 thread) of each model's quantized prefill/decode graphs through the profiler's
own runner (``profilers.standalone.OrtRunner``), *all* models timed round-robin within each round,
so every ratio to the original fp32 is taken within one round and the machine's slow drift cancels;
the table gives the median ratio and its range over rounds.

Then, per workload and original baseline, the pruned rows that dominate it: a test perplexity no
worse on that text, and faster than the baseline in *every* round (paired: the two timings of a
round are seconds apart).

    python benchmarks/pruned_vs_quantized.py [--student DIR] [--qat-steps 40] [--rounds 7]
    python benchmarks/pruned_vs_quantized.py --render benchmarks/results/pruned_vs_quantized.json

Prints the tables and writes benchmarks/results/pruned_vs_quantized.json. Quantization-aware
refines are kept in ``--work`` and reused by a rerun (delete them to retrain).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import recovery  # noqa: E402  (shares data, work dir, importance-permuted original and teacher cache)
import torch  # noqa: E402

from search.dominance import dominates  # noqa: E402

TESTS = ("persuasion", "narratives")
GRAPHS = ("prefill", "decode", "logits")
MIN_SAMPLE_MS = 400.0  # per runner per round: ~3 prefills, ~25-50 decode steps
DEFAULT_STUDENT = "recipe-e576-h9-f1280-l24-lr0.0002-s300-w2"


def qat_refine(args, imp: Path, paths: dict, student: Path, precision: str) -> Path:
    """The student distilled again from the original with ``precision`` simulated (reused when present)."""
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.refine import RefineConfig

    out = args.work / f"qat-{precision}-s{args.qat_steps}-lr{args.qat_lr:g}-{student.name}"
    if (out / "nasprune.json").exists() and (out / "config.json").exists():
        return out
    sub = load_model(str(student)).supernet().space.largest()
    cfg = RefineConfig(
        minutes=600,  # the step count ends the run: equal tokens whatever this VM's speed
        steps=args.qat_steps,
        batch_size=2,
        seq_len=256,
        lr=args.qat_lr,
        warmup_steps=2,
        repair=False,  # nothing is removed: the student keeps every channel it has
        quantization=precision,
        seed=args.seed,
    )
    t = time.perf_counter()
    record, _ = recovery.refine_in_work(args.work, imp, paths, sub, out, cfg, parent=student)
    print(
        f"  QAT {precision}: {record['training']['steps']} steps, {record['training']['tokens']} tokens "
        f"in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    return out


def graphs_of(model, directory: Path, precisions: list[str]) -> dict[str, dict[str, Path]]:
    """``model``'s prefill and full-logits graphs at fp32 and each precision (quantized after export)."""
    from compressor.quant.onnx_export import ExportRecipe, export_graphs
    from compressor.quant.quantize import quantize_graph_dir

    base = directory / "fp32"
    export_graphs(model, base, ExportRecipe(), graphs=GRAPHS)
    out = {"fp32": {g: base / g / "model.onnx" for g in GRAPHS}}
    for p in precisions:
        if p != "fp32":
            out[p] = quantize_graph_dir(base, directory / p, p, GRAPHS)
    return out


def _samples(step, iters: int, min_ms: float) -> list[float]:
    """At least ``iters`` iterations and ``min_ms`` of them: a decode step of a few ms needs many."""
    out = [step()]
    while len(out) < iters or sum(out) < min_ms:
        out.append(step())
    return out


def time_workloads(runners: dict, workloads: list, rounds: int, iters: int) -> dict[str, dict[str, list[float]]]:
    """Median ms per round of every runner on every workload, the runners interleaved within each round
    (the profiler's own step closures, ``profilers.standalone.OrtRunner.step_for``)."""
    out: dict[str, dict[str, list[float]]] = {}
    for w in workloads:
        steps = {k: r.step_for(w.kind, w.batch, w.seq, w.new_tokens) for k, r in runners.items()}
        for step in steps.values():
            for _ in range(3):
                step()
        out[str(w)] = {k: [] for k in steps}
        order = list(steps)
        for i in range(rounds):
            # the same graph in two slots of one round differed by up to 5 % (session 12): no slot is favoured
            random.Random(i).shuffle(order)
            for k in order:
                step = steps[k]
                out[str(w)][k].append(statistics.median(_samples(step, iters, MIN_SAMPLE_MS)))
    return out


def dominated_by(baseline: dict, rows: list[dict], test: str, workload: str) -> list[str]:
    """Pruned rows that dominate ``baseline`` on (``test`` perplexity, ``workload`` latency) by
    ``search.dominance.dominates`` with the latency given as paired rounds: at least as good on ``test``
    and faster in *every* round, each round's two timings taken within seconds of each other (paired:
    the machine's drift cancels, so no tolerance)."""
    base = baseline["latency"][workload]["round_ms"]
    return [
        r["name"]
        for r in rows
        if dominates(r["ppl"][test], r["latency"][workload]["round_ms"], baseline["ppl"][test], base)
    ]


def report(rows: list[dict], workloads: list[str]) -> dict:
    """Print the perplexity/latency table and, per workload, the dominance table; return the dominance."""
    ref = next(r for r in rows if r["name"] == "original @ fp32")
    pruned = [r for r in rows if r["group"] != "original"]  # every nasprune row may dominate a baseline
    print(
        f"\n| model @ precision | params | {' | '.join(TESTS)} | x orig fp32 ppl | "
        + " | ".join(f"{w} ms, x orig fp32 (range)" for w in workloads)
        + " |"
    )
    print("|---|---|" + "---|" * (len(TESTS) + 1 + len(workloads)))
    for r in rows:
        rel = " / ".join(f"{r['ppl'][t] / ref['ppl'][t]:.2f}" for t in TESTS)
        lat = [r["latency"][w] for w in workloads]
        print(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | "
            + " | ".join(f"{r['ppl'][t]:.2f}" for t in TESTS)
            + f" | {rel} | "
            + " | ".join(
                f"{x['ms']:.1f}, {x['vs_original_fp32']:.2f} ({x['range'][0]:.2f}-{x['range'][1]:.2f})" for x in lat
            )
            + " |"
        )
    dominance: dict = {}
    for w in workloads:
        print(f"\n{w}:\n\n| original baseline | dominated on persuasion by | dominated on narratives by |")
        print("|---|---|---|")
        for b in (r for r in rows if r["group"] == "original"):
            found = {t: dominated_by(b, pruned, t, w) for t in TESTS}
            dominance.setdefault(w, {})[b["name"]] = found
            print(f"| {b['name']} | " + " | ".join(", ".join(found[t]) or "**none**" for t in TESTS) + " |")
    return dominance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "recovery_work")
    ap.add_argument(
        "--student", type=Path, default=None, help=f"a refined pruned model dir (default WORK/{DEFAULT_STUDENT})"
    )
    ap.add_argument("--precisions", default="int8,int8-pc,int8-mixed", help="recipes of compressor.quant.quantize")
    ap.add_argument(
        "--qat-steps", type=int, default=40, help="quantization-aware refine steps of 2 x 256 tokens (0: no QAT rows)"
    )
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="LABEL=DIR@PRECISION",
        help="another pruned model dir to measure at one precision (repeatable), e.g. a refine trained "
        "quantization-aware all along",
    )
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument(
        "--original-qat",
        action="store_true",
        help="also refine the unpruned original quantization-aware at each recipe (what nasprune can add "
        "without pruning; the same graph as the PTQ original, so it can win on quality only)",
    )
    ap.add_argument("--seed", type=int, default=1, help="QAT data order (the KD run used 0)")
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument(
        "--workloads", default="prefill:1x128,decode:1x256", help="comma-separated workloads timed (1 thread)"
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pruned_vs_quantized.json")
    ap.add_argument("--render", type=Path, default=None, help="print the tables of a stored JSON (and re-judge it)")
    args = ap.parse_args()
    if args.render is not None:
        from compressor.elastic.modeldir import write_json_atomic

        data = json.loads(args.render.read_text())
        data["dominance"] = report(data["rows"], data["workloads"])
        write_json_atomic(args.render, data)
        return
    torch.set_num_threads(2)
    from transformers.utils import logging as hf_logging

    from compressor.core.precisions import needs_calibration
    from compressor.core.workload import Workload
    from compressor.elastic.evaluate import token_windows
    from compressor.elastic.modeldir import load_model, now, write_json_atomic
    from compressor.quant.engine_quality import graph_mean_loss
    from profilers.standalone import OrtRunner, load_average

    hf_logging.set_verbosity_error()
    precisions = [p for p in args.precisions.split(",") if p and p != "fp32"]
    static = [p for p in precisions if needs_calibration(p)]
    if static:
        raise SystemExit(f"error: static recipes ({', '.join(static)}) need calibration data; not supported here")
    student = args.student or args.work / DEFAULT_STUDENT
    if not (student / "nasprune.json").exists():
        raise SystemExit(
            f"error: {student} is not a refined model dir; run e.g. "
            "`python benchmarks/refine_recipe.py --runs '576,9,1280,24:2e-4' --steps 300` first"
        )
    paths = recovery.make_data(args.work)
    imp = recovery.importance_dir(argparse.Namespace(importance=None, work=args.work), paths)
    started, load_start = now(), load_average()

    extras = []
    for item in args.extra:
        label, sep, rest = item.partition("=")
        directory, at, precision = rest.rpartition("@")
        if not (sep and at and label and precision in ["fp32", *precisions]):
            raise SystemExit(f"error: --extra {item!r} is not LABEL=DIR@PRECISION with a precision of --precisions")
        if not (Path(directory) / "nasprune.json").exists():
            raise SystemExit(f"error: --extra {item!r}: {directory} is not a nasprune model dir")
        extras.append((label, "pruned", precision, Path(directory)))
    qat = {p: qat_refine(args, imp, paths, student, p) for p in precisions} if args.qat_steps > 0 else {}
    original = load_model(str(imp))
    windows = {
        "persuasion": token_windows(original.tokenizer, paths["persuasion"].read_text(), 256, args.test_tokens),
        "narratives": token_windows(original.tokenizer, paths["narratives"].read_text(), 256, args.test_tokens),
    }
    workloads = [Workload.parse(w) for w in args.workloads.split(",") if w]
    if not workloads or any(w.kind == "generate" for w in workloads):
        raise SystemExit("error: --workloads takes prefill:BxS and decode:BxC workloads")
    # (name, group, precision, model dir) of every shipped candidate
    candidates = [("original", "original", p, imp) for p in ["fp32", *precisions]]
    candidates += [("pruned KD", "pruned", p, student) for p in ["fp32", *precisions]]
    candidates += [(f"pruned KD + QAT {p}", "pruned", p, qat[p]) for p in qat]
    if args.original_qat and args.qat_steps > 0:
        candidates += [
            (f"original + QAT {p}", "unpruned QAT", p, qat_refine(args, imp, paths, imp, p)) for p in precisions
        ]
    candidates += extras
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nasprune-pvq-", dir=args.work) as tmp:
        graphs: dict[tuple[str, str], dict[str, Path]] = {}
        params: dict[str, int] = {}
        for directory in dict.fromkeys(d for *_, d in candidates):
            loaded = load_model(str(directory))
            sn = loaded.supernet().eval()
            from compressor.elastic.extract import extract

            model = extract(sn, sn.space.largest()).eval()
            params[str(directory)] = sum(t.numel() for t in model.parameters())
            wanted = [p for _, _, p, d in candidates if d == directory]
            t = time.perf_counter()
            made = graphs_of(model, Path(tmp) / directory.name, wanted)
            print(f"{directory.name}: exported {', '.join(wanted)} in {time.perf_counter() - t:.0f} s", flush=True)
            for p in wanted:
                graphs[(str(directory), p)] = made[p]
            del model, sn, loaded
        for name, group, p, directory in candidates:
            g = graphs[(str(directory), p)]
            ppl = {t: math.exp(graph_mean_loss(g["logits"], windows[t], threads=2)[0]) for t in TESTS}
            rows.append(
                {
                    "name": f"{name} @ {p}",
                    "group": group,
                    "precision": p,
                    "model": str(directory),
                    "params": params[str(directory)],
                    "ppl": ppl,
                }
            )
            print(f"  {rows[-1]['name']}: " + ", ".join(f"{t} {v:.2f}" for t, v in ppl.items()), flush=True)
        runners = {
            r["name"]: OrtRunner(
                {g: str(graphs[(r["model"], r["precision"])][g]) for g in ("prefill", "decode")},
                "CPUExecutionProvider",
                r["precision"],
                threads=1,
            )
            for r in rows
        }
        timing = time_workloads(runners, workloads, args.rounds, args.iters)
        del runners
    for w, by_name in timing.items():
        base = by_name["original @ fp32"]
        for r in rows:
            ratios = [a / b for a, b in zip(by_name[r["name"]], base)]
            r.setdefault("latency", {})[w] = {
                "ms": statistics.median(by_name[r["name"]]),
                "round_ms": by_name[r["name"]],
                "vs_original_fp32": statistics.median(ratios),
                "range": [min(ratios), max(ratios)],
            }
    dominance = report(rows, [str(w) for w in workloads])
    write_json_atomic(
        args.out,
        {
            "started": started,
            "finished": now(),
            "student": str(student),
            "student_refine": (load_model(str(student)).meta.subnetwork or {}).get("refine", {}).get("training"),
            "qat": {"steps": args.qat_steps, "lr": args.qat_lr, "batch": "2 x 256 tokens", "seed": args.seed},
            "test_tokens": args.test_tokens,
            "workloads": [str(w) for w in workloads],
            "threads": 1,
            "rounds": args.rounds,
            "iters": args.iters,
            "load_average": [load_start, load_average()],
            "rows": rows,
            "dominance": dominance,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
