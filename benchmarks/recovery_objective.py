"""Which cheap score predicts what a sub-network reaches *after* recovery? (issue 29's search objective)

The search ranks sub-networks by a quality score, but what ships is the sub-network after the refine
stage (closed-form repair, then logit KD from the original). A score is worth searching on only if it
orders architectures the way their post-refine test perplexity does. For ``--archs`` (default: ten
architectures of SmolLM2-135M spanning 40-90 % of the parameters, depth- and width-pruned), every
candidate score is measured, then each architecture is refined with a fixed number of steps (equal
tokens, whatever this VM's speed) and tested on text no stage has seen:

* ``-params``: the trivial baseline ("fewer parameters = worse"): a score must beat it;
* ``one-shot``: validation loss of the importance-permuted sub-network, no training (what the search
  scores when the super-network is barely trained, as in ``make demo``);
* ``block-proxy``: the additive "replace one block" estimate (:mod:`compressor.recovery.block_scores`);
* ``repair``: validation loss after closed-form repair (:mod:`compressor.recovery.repair`), which is
  also the refine stage's starting point;
* target: test perplexity after refine (repair + ``--steps`` KD steps of 2 x 256 tokens, lr 2e-4) on
  Persuasion (held-out Austen, the training domain) and BIG-bench narratives (general English).

Reported: Kendall tau of each score against each post-refine test perplexity, and the cost of each
score per architecture (the search pays it per candidate). Rows are stored as they finish
(``--out``, atomically) and skipped when present, so an interrupted run continues.

    python benchmarks/recovery_objective.py [--steps 30] [--archs "576,9,1280,24;..."]
    python benchmarks/recovery_objective.py --render
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import recovery  # noqa: E402  (shares data, evaluator, work dir, importance dir and teacher cache)
import torch  # noqa: E402

from compressor.elastic.search_space import SubNetwork  # noqa: E402

ARCHS = (
    "576,9,1408,28;576,6,1536,24;576,9,1280,24;504,9,1152,26;576,9,1024,20;"
    "432,9,1280,24;576,9,1024,15;432,9,1024,23;576,6,768,18;360,6,1024,22"
)
SCORES = ("-params", "one-shot", "block-proxy", "repair")
TESTS = ("persuasion", "narratives")


def parse_archs(spec: str) -> list[SubNetwork]:
    archs = [SubNetwork(*(int(x) for x in a.split(","))) for a in filter(None, (s.strip() for s in spec.split(";")))]
    if len(archs) < 3:
        raise SystemExit("--archs: give at least three architectures")
    return archs


class Rows:
    """One row per architecture, keyed by its name, stored atomically as each field arrives."""

    def __init__(self, path: Path):
        import json

        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"rows": {}, "meta": {}}

    def get(self, sub: SubNetwork) -> dict:
        return self.data["rows"].setdefault(str(sub), {"arch": sub.to_dict()})

    def save(self) -> None:
        from compressor.elastic.modeldir import write_json_atomic

        write_json_atomic(self.path, self.data)


def validation_windows(tokenizer, tokens: int, seq_len: int = 256):
    from compressor.core.data import PACKAGE_DATA
    from compressor.elastic.evaluate import token_windows

    text = (PACKAGE_DATA / "sense_and_sensibility_validation.txt").read_text()
    return token_windows(tokenizer, text, seq_len, tokens)


def measure_scores(args, rows: Rows, parent, archs, paths) -> None:
    """Every cheap score of every architecture, with its seconds."""
    from compressor.elastic.evaluate import hf_logits, mean_loss
    from compressor.recovery.block_scores import (
        BlockScoreConfig,
        compute_block_scores,
        estimate_loss,
        layer_drop_deltas,
    )
    from compressor.recovery.repair import repair_model

    sn = parent.supernet()
    val = validation_windows(parent.tokenizer, args.val_tokens)
    if "block_scores" not in rows.data["meta"]:
        t = time.perf_counter()
        cfg = BlockScoreConfig(tokens=512, seq_len=128, num_heads=(3, 6), ffn_dim=(384, 960), embed_dim=(288, 432))
        scores = compute_block_scores(sn, validation_windows(parent.tokenizer, 512, 128), cfg)
        rows.data["meta"]["block_scores"] = {"scores": scores, "seconds": time.perf_counter() - t}
        rows.save()
    block = rows.data["meta"]["block_scores"]["scores"]
    deltas = layer_drop_deltas(parent.meta)
    repair_cfg, windows = recovery.repair_setup(argparse.Namespace(repair_tokens=args.repair_tokens), parent, paths)
    for sub in archs:
        row = rows.get(sub)
        if "repair" in row:
            continue
        row["params"] = sn.space.num_params(sub)
        row["-params"] = -row["params"]
        t = time.perf_counter()
        with sn.selected(sub):
            row["one-shot"] = mean_loss(sn, val)
        row["one-shot_seconds"] = time.perf_counter() - t
        row["block-proxy"] = estimate_loss(block, sn.space, sub, deltas)["loss"]
        t = time.perf_counter()
        model, _ = repair_model(parent, sub, windows, repair_cfg)
        row["repair"] = mean_loss(hf_logits(model.eval()), val)
        row["repair_seconds"] = time.perf_counter() - t
        rows.save()
        print(
            f"  {sub}: params {row['params'] / 1e6:.1f}M  one-shot {row['one-shot']:.3f}  "
            f"block-proxy {row['block-proxy']:.3f}  repair {row['repair']:.3f} ({row['repair_seconds']:.0f}s)",
            flush=True,
        )


def measure_refined(args, rows: Rows, imp, paths, ev, archs) -> None:
    """Post-refine test perplexity of every architecture: the target the scores must predict."""
    from compressor.elastic.evaluate import hf_logits, mean_loss
    from compressor.recovery.refine import RefineConfig

    for sub in archs:
        row = rows.get(sub)
        if "refined" in row:
            continue
        cfg = RefineConfig(
            minutes=600,  # the step count ends every run: equal tokens, whatever this VM's speed
            steps=args.steps,
            batch_size=2,
            seq_len=256,
            lr=2e-4,
            warmup_steps=2,
            repair=True,
            repair_tokens=args.repair_tokens,
        )
        t = time.perf_counter()
        out = args.work / f"objective-{sub}-s{args.steps}"
        _, loaded = recovery.refine_in_work(args.work, imp, paths, sub, out, cfg)
        seconds = time.perf_counter() - t
        test = ev.model(loaded.model, False, list(TESTS))
        val = mean_loss(hf_logits(loaded.model.eval()), validation_windows(loaded.tokenizer, args.val_tokens))
        row["refined"] = {**test, "validation_loss": val, "seconds": seconds, "steps": args.steps}
        rows.save()
        print(f"  refined {sub}: {' '.join(f'{k} {test[k]:.2f}' for k in TESTS)} ({seconds / 60:.1f} min)", flush=True)


def table(data: dict) -> None:
    from scipy.stats import kendalltau

    rows = [r for r in data["rows"].values() if "refined" in r and "repair" in r]
    orig = data["meta"].get("original", {})
    print(f"\n{len(rows)} architectures; original: " + ", ".join(f"{k} {orig[k]:.2f}" for k in TESTS if k in orig))
    print("| arch | params | one-shot | block-proxy | repair | " + " | ".join(f"refined {t}" for t in TESTS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(TESTS))
    for r in sorted(rows, key=lambda r: -r["params"]):
        a = r["arch"]
        name = f"{a['embed_dim']}/{a['num_heads']}/{a['ffn_dim']}/{a['num_layers']}"
        refined = " | ".join(f"{r['refined'][t]:.2f}" for t in TESTS)
        print(
            f"| {name} | {r['params'] / 1e6:.1f}M | {r['one-shot']:.3f} | {r['block-proxy']:.3f} | "
            f"{r['repair']:.3f} | {refined} |"
        )
    if len(rows) < 3:
        return
    cost = {
        "-params": "0 s",
        "one-shot": f"{sum(r['one-shot_seconds'] for r in rows) / len(rows):.1f} s",
        "block-proxy": f"0 s (+{data['meta']['block_scores']['seconds']:.0f} s once)",
        "repair": f"{sum(r['repair_seconds'] for r in rows) / len(rows):.1f} s",
    }
    print("\n| score (lower = better) | " + " | ".join(f"tau vs refined {t}" for t in TESTS) + " | cost per arch |")
    print("|---|" + "---|" * len(TESTS) + "---|")
    data["meta"]["tau"] = {}
    for score in SCORES:
        taus = {t: float(kendalltau([r[score] for r in rows], [r["refined"][t] for r in rows])[0]) for t in TESTS}
        data["meta"]["tau"][score] = taus
        print(f"| {score} | " + " | ".join(f"{taus[t]:.3f}" for t in TESTS) + f" | {cost[score]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=ARCHS, help='"embed,heads,ffn,layers;..."')
    ap.add_argument("--steps", type=int, default=30, help="KD steps of 2 x 256 tokens per architecture")
    ap.add_argument("--repair-tokens", type=int, default=2048)
    ap.add_argument("--val-tokens", type=int, default=2048)
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "recovery_work")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery_objective.json")
    ap.add_argument("--render", action="store_true", help="reprint the tables of --out, run nothing")
    args = ap.parse_args()
    rows = Rows(args.out)
    if args.render:
        if not args.out.exists():
            raise SystemExit(f"--render: {args.out} does not exist")
        table(rows.data)
        return
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from compressor.elastic.modeldir import load_model

    hf_logging.set_verbosity_error()
    archs = parse_archs(args.archs)
    paths = recovery.make_data(args.work)
    imp = recovery.importance_dir(argparse.Namespace(importance=None, work=args.work), paths)
    parent = load_model(str(imp))
    ev = recovery.Evaluator(parent.tokenizer, paths, argparse.Namespace(test_tokens=args.test_tokens, mc_tasks=[]))
    meta = rows.data["meta"]
    meta.update(steps=args.steps, batch="2 x 256 tokens", repair_tokens=args.repair_tokens, val_tokens=args.val_tokens)
    if "original" not in meta:
        meta["original"] = ev.model(parent.model, False, list(TESTS))
        rows.save()
    measure_scores(args, rows, parent, archs, paths)
    measure_refined(args, rows, imp, paths, ev, archs)
    table(rows.data)
    rows.save()


if __name__ == "__main__":
    main()
