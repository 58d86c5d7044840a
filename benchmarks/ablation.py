"""The paper's ablation on SmolLM2-135M: held-out perplexity of sub-networks at ~90/75/60/50%
params for naive first-k, one-shot importance pruning, standard fine-tuning and the six
super-network strategies, over seeds; plus the Fig. 2d point (permutation alone helps) and the
super-network step time relative to a plain fine-tuning step.

Data (never the same text for two roles): importance calibration on emma, fine-tuning on four
other Austen novels, perplexity on persuasion. Budgets are tiny (this is a 2-core CPU at ~100
tokens/s/core); they are printed and stored with the results. Resumable: finished
(strategy, seed) runs are kept in the JSON and skipped on a rerun.

    python benchmarks/ablation.py [--steps 20] [--seeds 0 1] [--batch-size 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compressor.core.data import pack_text
from compressor.elastic.evaluate import perplexity, token_windows
from compressor.elastic.importance import compute_importance, layer_ranking, permute
from compressor.elastic.modeldir import LoadedModel, ModelMeta, load_model
from compressor.elastic.supernet import SuperNetwork
from compressor.recovery.train import STRATEGIES, TrainConfig, Trainer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"
TRAIN_BOOKS = ["sensesensibility.txt", "prideprejudice.txt", "mansfieldpark.txt", "northangerabbey.txt"]
RESULTS = Path(__file__).parent / "results"


def fresh(base_state, loaded, meta) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(loaded.model.config)
    model.load_state_dict(base_state)
    return LoadedModel(model.eval(), loaded.tokenizer, meta, loaded.path, loaded.source)


def eval_subs(sn, subs, windows) -> list[float]:
    sn.eval()
    out = []
    for sub in subs:
        with sn.selected(sub):
            out.append(perplexity(sn, windows, batch_size=8))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.75, 0.6, 0.5])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-ratio-steps", type=int, default=3, help="alternating steps for the step-time ratio")
    ap.add_argument(
        "--permuted",
        default=None,
        help="reuse a `nasprune importance default --data emma.txt` output instead of computing importance here",
    )
    ap.add_argument("--out", default=str(RESULTS / "ablation.json"))
    args = ap.parse_args()
    if not SHARED.exists():
        raise SystemExit(f"needs the Austen texts in {SHARED}")
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {"runs": {}}
    loaded = load_model("default")
    tok = loaded.tokenizer
    base_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    base_meta = loaded.meta
    windows = token_windows(tok, (SHARED / "persuasion.txt").read_text(), 256, args.eval_tokens)
    train_text = "\n\n".join((SHARED / b).read_text() for b in TRAIN_BOOKS)
    train_data = pack_text(tok, train_text, args.seq_len, source="four Austen novels")
    sn = loaded.supernet()
    subs = [sn.space.balanced_at(f) for f in args.fractions]
    full_params = sn.space.num_params(sn.space.largest())
    results["setup"] = {
        "subnetworks": [
            {"arch": s.to_dict(), "params": sn.space.num_params(s), "fraction": sn.space.num_params(s) / full_params}
            for s in subs
        ],
        "train": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "tokens_per_subnetwork_step": args.batch_size * args.seq_len,
        },
        "eval": {"text": "persuasion.txt", "tokens": int(windows.numel()), "window": 256},
        "calibration": {"text": "emma.txt", "tokens": args.calib_tokens},
    }

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))

    if "baselines" not in results:
        t = time.perf_counter()
        base_full = perplexity(sn.eval(), windows, batch_size=8)
        naive = eval_subs(sn, subs, windows)
        if args.permuted:  # a nasprune model dir written by `nasprune importance`
            permuted = load_model(args.permuted)
            ranking, info = permuted.meta.layer_ranking, permuted.meta.importance
            loaded.model.load_state_dict(permuted.model.state_dict())
            sn = SuperNetwork(loaded.model, loaded.meta.space_config, ranking)
        else:
            calib = pack_text(tok, (SHARED / "emma.txt").read_text(), 512, args.calib_tokens, "emma")
            scores = compute_importance(sn, calib, calib.subset(slice(0, 8)))
            permute(sn, scores)
            ranking, info = layer_ranking(scores), scores.info
            sn = SuperNetwork(loaded.model, loaded.meta.space_config, ranking)
        oneshot = eval_subs(sn, subs, windows)
        results["baselines"] = {
            "original_full_ppl": base_full,
            "naive_first_k": naive,
            "one_shot_importance": oneshot,
            "importance": {k: v for k, v in info.items() if k != "layer_scores"},
            "layer_ranking": ranking,
            "seconds": time.perf_counter() - t,
        }
        torch.save(
            {"state": {k: v.clone() for k, v in loaded.model.state_dict().items()}, "ranking": ranking, "info": info},
            RESULTS / "ablation_permuted.pt",
        )
        save()
        print(f"original {base_full:.1f}; naive {naive}; one-shot importance {oneshot}")
    perm = torch.load(RESULTS / "ablation_permuted.pt", weights_only=False)
    perm_meta = ModelMeta(search_space=base_meta.search_space, layer_ranking=perm["ranking"], importance=perm["info"])

    for strategy in args.strategies:
        for seed in args.seeds:
            key = f"{strategy}/seed{seed}"
            if key in results["runs"]:
                continue
            uses_importance, _ = STRATEGIES[strategy]
            start = fresh(perm["state"], loaded, perm_meta) if uses_importance else fresh(base_state, loaded, base_meta)
            cfg = TrainConfig(
                strategy=strategy,
                steps=args.steps,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                lr=args.lr,
                warmup_steps=max(1, args.steps // 10),
                seed=seed,
                checkpoint_every=10**9,
                log_every=1,
            )
            work = RESULTS / "ablation_work" / key.replace("/", "_")
            if work.exists():
                for f in work.iterdir():
                    f.unlink()
            trainer = Trainer(start, train_data, cfg, work)
            stats = trainer.run(progress=False)
            log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
            ppl = eval_subs(trainer.supernet, subs, windows)
            with trainer.supernet.selected(trainer.supernet.space.largest()):
                full = perplexity(trainer.supernet.eval(), windows, batch_size=8)
            results["runs"][key] = {
                "strategy": strategy,
                "seed": seed,
                "ppl": ppl,
                "full_ppl": full,
                "train_seconds": stats["seconds"],
                "tokens": stats["tokens"],
                "mean_step_seconds": statistics.mean(r["step_seconds"] for r in log[1:] or log),
                "config": asdict(cfg),
            }
            (work / "checkpoint.pt").unlink(missing_ok=True)
            save()
            print(f"{key}: ppl {[round(p, 1) for p in ppl]} full {full:.1f} ({stats['seconds']:.0f}s)")
    if "step_time" not in results and args.step_ratio_steps:
        results["step_time"] = step_time_ratio(perm, loaded, perm_meta, train_data, args)
        save()
    report(results, out_path)


def step_time_ratio(perm, loaded, meta, train_data, args) -> dict:
    """Mean step time, sandwich vs plain fine-tuning, alternating steps in one process (same noise)."""
    import tempfile

    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("standard", "importance-random"):
            cfg = TrainConfig(
                strategy=name,
                steps=10**6,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                lr=args.lr,
                checkpoint_every=10**9,
            )
            trainers[name] = Trainer(fresh(perm["state"], loaded, meta), train_data, cfg, Path(tmp) / name)
        times = {name: [] for name in trainers}
        for _ in range(args.step_ratio_steps + 1):  # the first round warms up
            for name, tr in trainers.items():
                t = time.perf_counter()
                tr.train_step()
                times[name].append(time.perf_counter() - t)
    std, sw = statistics.median(times["standard"][1:]), statistics.median(times["importance-random"][1:])
    return {"standard_s": std, "sandwich_s": sw, "ratio": sw / std, "steps": args.step_ratio_steps}


def report(results: dict, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    fracs = [s["fraction"] for s in setup["subnetworks"]]
    rows = {
        "naive first-k (no training)": [results["baselines"]["naive_first_k"]],
        "one-shot importance (no training)": [results["baselines"]["one_shot_importance"]],
    }
    for run in results["runs"].values():
        rows.setdefault(run["strategy"], []).append(run["ppl"])
    header = "method".ljust(36) + "".join(f"{f:>16.0%}" for f in fracs)
    print(header)
    table = {}
    for name, runs in rows.items():
        means = [statistics.mean(r[i] for r in runs) for i in range(len(fracs))]
        spread = [(max(r[i] for r in runs) - min(r[i] for r in runs)) / 2 for i in range(len(fracs))]
        table[name] = {"mean": means, "half_range": spread, "n_seeds": len(runs)}
        print(name.ljust(36) + "".join(f"{m:>10.1f} ±{s:<5.1f}" for m, s in zip(means, spread)))
    if "step_time" in results:
        st = results["step_time"]
        print(
            f"super-network (sandwich) step / plain fine-tuning step: {st['ratio']:.2f}x "
            f"({st['sandwich_s']:.2f}s vs {st['standard_s']:.2f}s, interleaved in one process)"
        )
    results["table"] = table
    out_path.write_text(json.dumps(results, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, t in table.items():
        ax.errorbar([100 * f for f in fracs], t["mean"], yerr=t["half_range"], marker="o", capsize=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("sub-network size (% of SmolLM2-135M params)")
    ax.set_ylabel("perplexity on persuasion (held out)")
    ax.set_title(
        f"{setup['train']['steps']} steps x {setup['train']['tokens_per_subnetwork_step']} tokens per sub-network"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
