"""Refine recipe screening: which ~75 % architecture and which learning rate recover most per token?

``benchmarks/recovery.py`` compares recovery *methods* at equal minutes; this screens the knobs of
the winning method (refine: closed-form repair, then logit KD from the original) at equal
*tokens*, the unit that transfers between this project's VMs (their speed differs 2-5x). Every run
repairs the sub-network on the same 4,096 training tokens and then distils it for ``--steps``
steps of 2 x 256 tokens from the same cached teacher (``recovery_work/teacher``), so a row differs
from another only in what its label says. Test texts are the recovery benchmark's: Persuasion
(held-out Austen, the training domain) and BIG-bench narratives (out of domain).

Rows are stored as they finish (``--out``, rewritten atomically) and skipped when present, so an
interrupted run continues. Prints a table with the repair-only and original rows beside.

    python benchmarks/refine_recipe.py --runs "576,9,1280,24:2e-4;576,9,1152,26:2e-4" --steps 35
    python benchmarks/refine_recipe.py --repair-only --runs "576,9,896,30;576,9,1536,21"
    python benchmarks/refine_recipe.py --runs "576,9,1280,24:2e-4" --steps 35 --distill-states 1
    python benchmarks/refine_recipe.py --runs "576,9,1280,24:2e-4" --steps 50 --block-steps 100
    python benchmarks/refine_recipe.py --runs "576,9,1280,24:2e-4" --steps 100 --quantization int8-pc
    python benchmarks/refine_recipe.py --runs "576,9,1024,15:2e-4" --steps 30 --block-steps 25 --no-repair
    python benchmarks/refine_recipe.py --out benchmarks/results/bld_vs_kd.json --render

``--block-steps`` adds block-local distillation of the chosen sub-network between repair and KD
(:func:`compressor.recovery.bld.distill_chosen_blocks`); its seconds are stored beside the KD's, so rows compare
at equal *minutes* too (issue 11's "BLD + KD in <= 0.5x the minutes of KD alone"). All rows of one
comparison must come from one run on one machine: minutes do not transfer between VMs. ``--no-repair``
starts from the one-shot weights, so BLD + KD is compared with end-to-end KD alone, the issue's literal
baseline (``benchmarks/results/bld_vs_kd.json``); repair's own seconds are stored for the rows that repair.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import recovery  # noqa: E402  (shares data, evaluator, work dir and teacher cache)
import torch  # noqa: E402

from compressor.elastic.search_space import SubNetwork  # noqa: E402

TESTS = ["persuasion", "narratives"]


def parse_runs(spec: str) -> list[tuple[SubNetwork, float | None]]:
    """``"e,h,f,l:lr;..."`` -> [(sub-network, lr or None)]."""
    runs = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        arch, _, lr = item.partition(":")
        runs.append((SubNetwork(*(int(x) for x in arch.split(","))), float(lr) if lr else None))
    if not runs:
        raise SystemExit("--runs names no architecture")
    return runs


class RecipeResults:
    """Rows keyed by their label, stored (atomically) as soon as each exists."""

    def __init__(self, path: Path):
        import json

        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}

    def has(self, key: str) -> bool:
        return any(r["key"] == key for r in self.data["rows"])

    def add(self, row: dict) -> None:
        from compressor.elastic.modeldir import write_json_atomic

        self.data["rows"].append(row)
        write_json_atomic(self.path, self.data)
        print(
            f"  {row['key']:<44} persuasion {row['persuasion']:8.2f}  narratives {row['narratives']:8.2f}"
            f"  {row.get('tokens', 0):>7} tokens  {row['seconds'] / 60:5.1f} min",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", help='"embed,heads,ffn,layers:lr;..." (lr omitted with --repair-only)')
    ap.add_argument("--steps", type=int, default=35, help="training steps of 2 x 256 tokens per run")
    ap.add_argument("--repair-only", action="store_true", help="closed-form repair, no training")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "recovery_work")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "refine_recipe.json")
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--distill-states",
        type=float,
        default=0.0,
        help="weight of intermediate-state distillation (the parent's blocks run live every step); 0: logits only",
    )
    ap.add_argument(
        "--no-repair",
        action="store_true",
        help="start from the one-shot weights (end-to-end KD alone, or BLD + KD, without closed-form repair)",
    )
    ap.add_argument("--block-steps", type=int, default=0, help="block-local distillation steps per block first")
    ap.add_argument("--block-lr", type=float, default=1e-4)
    ap.add_argument("--block-tokens", type=int, default=8192)
    ap.add_argument(
        "--quantization",
        default=None,
        help="quantization-aware refine: train with this recipe simulated all along (the rows stay fp32 torch "
        "perplexity; benchmarks/pruned_vs_quantized.py --extra measures them through the quantized engine)",
    )
    ap.add_argument("--render", action="store_true", help="reprint the tables of --out, run nothing")
    args = ap.parse_args()
    if args.render:
        if not args.out.exists():
            raise SystemExit(f"--render: {args.out} does not exist")
        data = RecipeResults(args.out).data
        print_table(data)
        print_time_to_target(data)
        return
    if not args.runs:
        raise SystemExit("give --runs (or --render)")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from compressor.elastic.modeldir import load_model

    hf_logging.set_verbosity_error()
    paths = recovery.make_data(args.work)
    imp = recovery.importance_dir(argparse.Namespace(importance=None, work=args.work), paths)
    parent = load_model(str(imp))
    ev = recovery.Evaluator(parent.tokenizer, paths, argparse.Namespace(test_tokens=args.test_tokens, mc_tasks=[]))
    results = RecipeResults(args.out)
    results.data.setdefault("meta", {}).update(test_tokens=args.test_tokens, batch="2 x 256 tokens", repair_tokens=4096)
    if not results.has("original"):
        t = time.perf_counter()
        results.add({"key": "original", "seconds": time.perf_counter() - t, **ev.model(parent.model, False, TESTS)})
    for sub, lr in parse_runs(args.runs):
        t = time.perf_counter()
        if args.repair_only:
            key = f"repair {sub}"
            if results.has(key):
                continue
            from compressor.recovery.repair import repair_model

            cfg, windows = recovery.repair_setup(argparse.Namespace(repair_tokens=4096), parent, paths)
            model, _ = repair_model(parent, sub, windows, cfg)
            params = sum(p.numel() for p in model.parameters())
            results.add(
                {
                    "key": key,
                    "arch": sub.to_dict(),
                    "params": params,
                    "tokens": 0,
                    "seconds": time.perf_counter() - t,
                    **ev.model(model, False, TESTS),
                }
            )
            continue
        if lr is None:
            raise SystemExit(f"{sub}: give a learning rate (arch:lr) or --repair-only")
        states = f" states {args.distill_states:g}" if args.distill_states > 0 else ""
        if args.block_steps > 0:
            states += f" blocks {args.block_steps} lr {args.block_lr:g} tokens {args.block_tokens}"
        if args.quantization:
            states += f" qat {args.quantization}"
        if args.no_repair:
            states += " no-repair"
        key = f"refine {sub} lr {lr:g} steps {args.steps} warmup {args.warmup_steps}{states}"
        if results.has(key):
            continue
        from compressor.recovery.refine import RefineConfig

        out = args.work / f"recipe-{sub}-lr{lr:g}-s{args.steps}-w{args.warmup_steps}{states.replace(' ', '-')}"
        cfg = RefineConfig(
            minutes=600,  # the step count ends every run: equal tokens, whatever this VM's speed
            steps=args.steps,
            batch_size=2,
            seq_len=256,
            lr=lr,
            warmup_steps=args.warmup_steps,
            repair=not args.no_repair,
            repair_tokens=4096,
            distill_states=args.distill_states,
            block_steps=args.block_steps,
            block_lr=args.block_lr,
            block_tokens=args.block_tokens,
            quantization=args.quantization,
        )
        record, loaded = recovery.refine_in_work(args.work, imp, paths, sub, out, cfg)
        model = loaded.model
        results.add(
            {
                "key": key,
                "arch": sub.to_dict(),
                "lr": lr,
                "steps": record["training"]["steps"],
                "tokens": record["training"]["tokens"],
                "distill_states": args.distill_states,
                "quantization": args.quantization,
                "training_seconds": record["training"]["seconds"],
                "repair": not args.no_repair,
                "repair_seconds": record.get("repair_seconds", 0.0),
                "block_steps": args.block_steps,
                "block_seconds": (record.get("block_distillation") or {}).get("seconds", 0.0),
                "block_teacher_seconds": (record.get("block_distillation") or {}).get("teacher_seconds", 0.0),
                "ppl_repaired_val": record.get("ppl_repaired"),
                "ppl_blocks_val": record.get("ppl_blocks"),
                "params": sum(p.numel() for p in model.parameters()),
                "seconds": time.perf_counter() - t,
                **ev.model(model, False, TESTS),
            }
        )
    print_table(results.data)
    print_time_to_target(results.data)


def minutes(row: dict) -> float:
    """CPU minutes a row spent on recovery: repair + block-local distillation + KD training (the shared
    teacher-cache fill excluded: every KD row of one run reads the same cache)."""
    return sum((row.get(k) or 0.0) for k in ("repair_seconds", "block_seconds", "training_seconds")) / 60


def print_table(data: dict) -> None:
    ref = next(r for r in data["rows"] if r["key"] == "original")
    print("\n| run | params | tokens | repair + BLD + KD min | persuasion | x orig | narratives | x orig |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(data["rows"], key=lambda r: (r.get("tokens", 0), r["key"])):
        print(
            f"| {r['key']} | {r.get('params', 0) / 1e6:.1f}M | {r.get('tokens', 0)} | {minutes(r):.2f} "
            f"| {r['persuasion']:.2f} "
            f"| {r['persuasion'] / ref['persuasion']:.2f} | {r['narratives']:.2f} "
            f"| {r['narratives'] / ref['narratives']:.2f} |"
        )


def minutes_to_reach(curve: list[tuple[float, float]], ppl: float) -> tuple[float, str]:
    """Minutes end-to-end KD alone needs to reach ``ppl``, linearly interpolated between its measured runs
    ``(minutes, ppl)`` (each run has its own cosine schedule, so these are anytime endpoints, not one curve),
    never extrapolated: ``("<=", shortest run's minutes)`` when that run already got there, ``(">", longest
    run's minutes)`` when no run did, else ``("", interpolated minutes)``; returned as (minutes, qualifier)."""
    points = sorted(curve)
    if ppl >= points[0][1]:
        return points[0][0], "<="
    for (m0, p0), (m1, p1) in zip(points, points[1:]):
        if p1 <= ppl <= p0:
            return m0 + (p0 - ppl) / (p0 - p1) * (m1 - m0), ""
    return points[-1][0], ">"


RATIO_QUALIFIER = {"": "", "<=": ">= ", ">": "< "}  # a bound on KD's minutes bounds the ratio the other way


def print_time_to_target(data: dict) -> None:
    """Issue 11's goal as a table: for every row of an architecture that also has >= 2 runs of end-to-end
    KD alone from the one-shot weights (``--no-repair``, no BLD, fp32), the minutes KD alone needs to reach
    that row's perplexity, and the ratio of the row's own minutes to them (goal: <= 0.5)."""

    def alone(r: dict) -> bool:
        return r.get("repair", True) is False and not r.get("block_steps") and not r.get("quantization")

    lines = []
    for arch in sorted({str(r["arch"]) for r in data["rows"] if r.get("arch")}):
        rows = [r for r in data["rows"] if str(r.get("arch")) == arch and not r.get("distill_states")]
        curve = {t: [(minutes(r), r[t]) for r in rows if alone(r)] for t in TESTS}
        if len(curve[TESTS[0]]) < 2:
            continue
        for r in sorted((r for r in rows if not alone(r)), key=minutes):
            cells = []
            for t in TESTS:
                need, qualifier = minutes_to_reach(curve[t], r[t])
                cells.append(
                    f"{r[t]:.2f} | {qualifier}{need:.2f} | {RATIO_QUALIFIER[qualifier]}{minutes(r) / need:.2f}"
                )
            lines.append(f"| {r['key']} | {minutes(r):.2f} | " + " | ".join(cells) + " |")
    if lines:
        print(
            "\nminutes KD alone (from the one-shot weights) needs to reach each row's perplexity; ratio = row's / KD's"
        )
        print("| run | min | persuasion | KD alone min | ratio | narratives | KD alone min | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
