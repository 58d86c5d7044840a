"""Recovery benchmark: how much quality does each recovery method buy per CPU-minute?

Fixed sub-networks of SmolLM2-135M-Instruct (the FACTS.md architectures at ~75 % and ~50 % of
the parameters, plus a width-pruned ~50 % one), equal wall-clock budgets on this machine, the
same general training data (four Austen novels interleaved with 7,000 instruction examples),
and test text no stage has seen:

* ``persuasion``: ../shared/data/text/persuasion.txt (a novel never trained or calibrated on);
* ``instruct``: 500 held-out instruction examples (never trained on);
* MC accuracy on BIG-bench multiple-choice tasks from ../shared/data/eval (lm-eval, local).

Methods: one-shot importance pruning (no training); + closed-form repair (:mod:`compressor.recovery.repair`);
sandwich super-network training with cross-entropy, with logit distillation from the original
(cached top-k teacher), with in-place distillation from the largest sub-network; and refine
(repair + distillation of each sub-network on its own; the budget is split over the archs so the
total equals one sandwich run). References: the original in fp32 and the original through ONNX
Runtime dynamic INT8 (engine perplexity on a prefix, next to the fp32 engine on the same tokens).

Every result is stored as soon as it exists (``--out`` JSON, rewritten atomically), so an
interrupted run continues where it stopped. Prints a table, writes JSON and a plot of test
perplexity against CPU minutes per method.

    python benchmarks/recovery.py --minutes 10 --segments 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

import torch  # noqa: E402

from compressor.core.console import offline_by_default  # noqa: E402

offline_by_default([])

from compressor.elastic.search_space import SubNetwork  # noqa: E402

ARCHS = {
    "75% (576/1280/24)": SubNetwork(576, 9, 1280, 24),
    "50% depth (576/1024/15)": SubNetwork(576, 9, 1024, 15),
    "50% width (432/1024/23)": SubNetwork(432, 9, 1024, 23),
}
SANDWICH = {
    "sandwich-ce": {},
    "sandwich-kd": {"distill": "logits", "teacher": "original"},
    "inplace-kd": {"distill": "logits", "teacher": "largest"},
}


# ---- data ------------------------------------------------------------------------------------
def make_data(work: Path) -> dict[str, Path]:
    """General training text (novels interleaved with instructions) and held-out instruction text."""
    paths = {
        "train": work / "general_train.txt",
        "instruct_test": work / "instruct_test.txt",
        "persuasion": SHARED / "text" / "persuasion.txt",
    }
    paths["narratives"] = make_narratives(work / "narratives_test.txt")
    if all(p.exists() for p in paths.values()):
        return paths
    rng = random.Random(0)
    rows = [json.loads(line) for line in (SHARED / "instruct" / "natural_instructions_alpaca_8k.jsonl").open()]
    rng.shuffle(rows)

    def render(r):
        return (r["instruction"] + "\n" + (r["input"] + "\n" if r["input"] else "") + r["output"]).strip()

    train_rows = [render(r) for r in rows[:7000]]
    chunks = []
    for name in ("emma.txt", "mansfieldpark.txt", "prideprejudice.txt", "northangerabbey.txt"):
        novel = (SHARED / "text" / name).read_text()
        chunks += [novel[i : i + 2000] for i in range(0, len(novel), 2000)]
    rng.shuffle(chunks)
    out, j = [], 0
    for chunk in chunks:
        out += [chunk, "\n\n".join(train_rows[j : j + 3])]
        j = (j + 3) % len(train_rows)
    work.mkdir(parents=True, exist_ok=True)
    paths["train"].write_text("\n\n".join(out))
    paths["instruct_test"].write_text("\n\n".join(render(r) for r in rows[7500:8000]))
    return paths


NARRATIVES = "bb_abstract_narrative_understanding__4_distractors.jsonl"
NARRATIVE_PREAMBLE = "In what follows, we provide short narratives, each of which illustrates a common proverb."


def make_narratives(path: Path) -> Path:
    """Test text from outside the training domain: the short modern narratives of BIG-bench's
    abstract_narrative_understanding (contexts only, preamble removed, each once). Every prose text in
    ../shared is Austen, the training novels included, so Persuasion measures held-out text of the
    training domain; these narratives measure general English that no stage trained on."""
    if path.exists():
        return path
    seen: dict[str, None] = {}
    for line in (SHARED / "eval" / NARRATIVES).open():
        story = json.loads(line)["context"].replace(NARRATIVE_PREAMBLE, "").strip()
        seen.setdefault(story, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(seen))
    return path


# ---- evaluation ------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, tokenizer, paths, args):
        from compressor.elastic.evaluate import token_windows

        self.tok, self.args = tokenizer, args
        self.windows = {
            "persuasion": token_windows(tokenizer, paths["persuasion"].read_text(), 256, args.test_tokens),
            "instruct": token_windows(tokenizer, paths["instruct_test"].read_text(), 256, args.test_tokens),
            "narratives": token_windows(tokenizer, paths["narratives"].read_text(), 256, args.test_tokens),
        }

    def ppl(self, logits_fn, names=None) -> dict:
        from compressor.elastic.evaluate import perplexity

        return {name: perplexity(logits_fn, w) for name, w in self.windows.items() if names is None or name in names}

    def mc(self, model) -> dict:
        import tempfile

        from compressor.elastic.evaluate import lm_eval_tasks, write_local_tasks

        if not self.args.mc_tasks:
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            files = [SHARED / "eval" / f"{t}.jsonl" for t in self.args.mc_tasks]
            names = write_local_tasks(files, Path(tmp))
            res = lm_eval_tasks(model, self.tok, names, Path(tmp), self.args.mc_limit)
        return {t: m.get("acc") for t, m in res.items()}

    def model(self, model, with_mc: bool, names=None) -> dict:
        from compressor.elastic.evaluate import hf_logits

        out = self.ppl(hf_logits(model.eval()), names)
        if with_mc:
            out["mc"] = self.mc(model)
        return out


# ---- results store ---------------------------------------------------------------------------
class Results:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}

    def has(self, method, arch, minutes) -> bool:
        return any(
            r["method"] == method and r["arch"] == arch and abs(r["minutes"] - minutes) < 1e-6
            for r in self.data["rows"]
        )

    def add(self, **row) -> None:
        self.data["rows"].append(row)
        self.save()
        mc = row.get("mc") or {}
        print(
            f"  {row['method']:<14} {row['arch']:<24} {row['minutes']:6.1f} min  persuasion {row['persuasion']:9.2f}  "
            f"narratives {row.get('narratives', float('nan')):9.2f}  instruct {row['instruct']:9.2f}"
            + "".join(f"  {k} {v:.3f}" for k, v in mc.items() if v is not None),
            flush=True,
        )

    def save(self) -> None:
        from compressor.elastic.modeldir import write_json_atomic

        write_json_atomic(self.path, self.data)


# ---- methods ---------------------------------------------------------------------------------
def importance_dir(args, paths) -> Path:
    if args.importance:
        return Path(args.importance)
    out = args.work / "importance"
    if (out / "nasprune.json").exists():
        return out
    from compressor.core.data import load_data
    from compressor.elastic.importance import compute_importance, layer_ranking, permute
    from compressor.elastic.importance_io import save_importance
    from compressor.elastic.modeldir import load_model

    loaded = load_model("default")
    calib = load_data(loaded.tokenizer, str(paths["train"]), 512, 16384)
    sn = loaded.supernet()
    scores = compute_importance(sn, calib, calib.subset(slice(0, 4)), "drop-loss", 8)
    save_importance(loaded, permute(sn, scores), layer_ranking(scores), out)
    return out


def run_one_shot(args, results, ev, imp):
    from compressor.elastic.extract import extract
    from compressor.elastic.modeldir import load_model

    parent = load_model(str(imp))
    sn = parent.supernet()
    for name, sub in ARCHS.items():
        if not results.has("one-shot", name, 0.0):
            results.add(
                method="one-shot",
                arch=name,
                minutes=0.0,
                params=sn.space.num_params(sub),
                **ev.model(extract(sn, sub), with_mc=True),
            )


def repair_setup(args, parent, paths):
    """The repair recipe of the ``repair`` rows: its config and calibration windows (training text)."""
    from compressor.recovery.repair import RepairConfig, calibration_windows

    cfg = RepairConfig(tokens=args.repair_tokens)
    return cfg, calibration_windows(parent.tokenizer, str(paths["train"]), cfg)


def refine_dir(args, method: str, sub, minutes: float) -> Path:
    return args.work / f"{method}-{sub}-{minutes:g}min"


def run_repair(args, results, ev, imp, paths):
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.repair import repair_model

    parent = load_model(str(imp))
    cfg, windows = repair_setup(args, parent, paths)
    for name, sub in ARCHS.items():
        if any(r["method"] == "repair" and r["arch"] == name for r in results.data["rows"]):
            continue
        t = time.perf_counter()
        model, report = repair_model(parent, sub, windows, cfg)
        minutes = (time.perf_counter() - t) / 60
        results.add(
            method="repair",
            arch=name,
            minutes=minutes,
            params=sum(p.numel() for p in model.parameters()),
            repair=report.summary(),
            **ev.model(model, with_mc=True),
        )


def sandwich_config(args, minutes: float, **distill):
    """The one training recipe every end-to-end method shares (only the loss differs)."""
    from compressor.recovery.train import TrainConfig

    return TrainConfig(
        strategy="importance-random",
        steps=args.steps,
        max_minutes=minutes,
        batch_size=args.batch_size,
        seq_len=256,
        lr=args.lr,
        warmup_steps=3,
        checkpoint_every=5,
        seed=args.seed,
        **distill,
    )


def run_sandwich(args, results, ev, imp, paths, method):
    from compressor.elastic.extract import extract
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.train import run_training

    out = args.work / method
    segment = args.minutes / args.segments
    for seg in range(1, args.segments + 1):
        budget = segment * seg
        done = [r for r in results.data["rows"] if r["method"] == method]
        if any(r.get("budget") == budget for r in done) or any(r.get("schedule_done") for r in done):
            continue
        cfg = sandwich_config(args, segment, **SANDWICH[method])
        resume = (args.work / f"{method}.train" / "checkpoint.pt").exists()
        t = time.perf_counter()
        run_training(
            str(imp),
            str(paths["train"]),
            out,
            cfg,
            resume=resume,
            overwrite=True,
            log=lambda *_: None,
            teacher_cache_dir=args.work / "teacher",
        )
        wall = time.perf_counter() - t
        trained = load_model(str(out))
        info = trained.meta.provenance["training"]
        sn = trained.supernet()
        first = next(iter(ARCHS))
        seconds = sum(r.get("train_seconds", 0.0) for r in done if r["arch"] == first) + info["seconds"]
        finished = not info["stopped_by_time_budget"]  # the schedule ended before the budget: no more segments
        for name, sub in ARCHS.items():
            # minutes = training time actually spent (excluding the one-off teacher-cache fill, reported apart)
            results.add(
                method=method,
                arch=name,
                minutes=seconds / 60,
                budget=budget,
                schedule_done=finished,
                params=sn.space.num_params(sub),
                steps=info["steps"],
                tokens=info["tokens"],
                train_seconds=info["seconds"],
                wall_seconds=wall,
                distill=info.get("distill"),
                **ev.model(extract(sn, sub), with_mc=seg == args.segments or finished),
            )


def run_bld(args, results, ev, imp, paths):
    """Block-local distillation alone, then + end-to-end KD (from the original) for the rest of the budget."""
    from compressor.elastic.extract import extract
    from compressor.elastic.modeldir import load_model, save_model_dir
    from compressor.recovery.bld import BlockDistillConfig, distill_blocks
    from compressor.recovery.repair import RepairConfig, calibration_windows
    from compressor.recovery.train import run_training

    parent = load_model(str(imp))
    windows = calibration_windows(parent.tokenizer, str(paths["train"]), RepairConfig(tokens=8192, seq_len=256))
    bld_dir = args.work / "bld-model"
    if not any(r["method"] == "bld" for r in results.data["rows"]):
        cfg = BlockDistillConfig(
            steps=args.bld_steps, batch_size=4, seq_len=256, tokens=8192, lr=args.lr, processes=args.bld_processes
        )
        t = time.perf_counter()
        trained, report = distill_blocks(str(imp), windows, args.work / "bld", cfg, log=print)
        minutes = (time.perf_counter() - t) / 60
        save_model_dir(trained.model, trained.tokenizer, trained.meta, bld_dir, overwrite=True)
        sn = trained.supernet()
        for name, sub in ARCHS.items():
            results.add(
                method="bld",
                arch=name,
                minutes=minutes,
                params=sn.space.num_params(sub),
                bld={k: report[k] for k in ("seconds", "teacher_fill_seconds")},
                **ev.model(extract(sn, sub), with_mc=True),
            )
    bld_minutes = next(r["minutes"] for r in results.data["rows"] if r["method"] == "bld")
    if any(r["method"] == "bld+kd" for r in results.data["rows"]):
        return
    remaining = max(0.5, args.minutes - bld_minutes)
    cfg = sandwich_config(args, remaining, distill="logits")
    out = args.work / "bld+kd"
    run_training(
        str(bld_dir),
        str(paths["train"]),
        out,
        cfg,
        overwrite=True,
        log=lambda *_: None,
        teacher_cache_dir=args.work / "teacher",
        teacher=str(imp),
    )
    trained = load_model(str(out))
    info = trained.meta.provenance["training"]
    sn = trained.supernet()
    for name, sub in ARCHS.items():
        results.add(
            method="bld+kd",
            arch=name,
            minutes=bld_minutes + info["seconds"] / 60,
            params=sn.space.num_params(sub),
            steps=info["steps"],
            tokens=info["tokens"],
            **ev.model(extract(sn, sub), with_mc=True),
        )


def run_bld_speed(args, results, imp, paths):
    """BLD throughput on the same cached activations and work (teacher fill excluded): 1 process x 1 thread
    vs 2 processes x 1 thread (how the work scales over workers: processes, GPUs, machines), and 1 process
    x all threads (what one process gets from intra-op threads on this machine's cores)."""
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.bld import BlockDistillConfig, distill_blocks
    from compressor.recovery.repair import RepairConfig, calibration_windows

    if "threads" in results.data["meta"].get("bld_speed", {}):
        return
    parent = load_model(str(imp))
    windows = calibration_windows(parent.tokenizer, str(paths["train"]), RepairConfig(tokens=8192, seq_len=256))
    cores = os.cpu_count() or 1
    speed = {}
    for name, processes, threads in (("1x1", 1, 1), ("2x1", 2, 1), (f"1x{cores}", 1, cores)):
        work = args.work / f"bld-speed-{name}"
        work.mkdir(parents=True, exist_ok=True)
        teacher = work / "teacher"
        if not teacher.exists():
            shared = args.work / "bld" / "teacher"  # the same cached activations (filled by the first, untimed)
            shared.mkdir(parents=True, exist_ok=True)
            teacher.symlink_to(shared.resolve())
        cfg = BlockDistillConfig(
            steps=args.bld_speed_steps,
            batch_size=4,
            seq_len=256,
            tokens=8192,
            lr=args.lr,
            processes=processes,
            threads=threads,
        )
        _, report = distill_blocks(str(imp), windows, work, cfg, log=lambda *_: None)
        speed[name] = report["seconds"]
        print(
            f"  BLD {processes} process(es) x {threads} thread(s): {report['seconds']:.1f} s "
            f"for 30 blocks x {args.bld_speed_steps} steps",
            flush=True,
        )
    results.data["meta"]["bld_speed"] = {
        "seconds": speed,
        "threads": True,
        "cores": cores,
        "speedup_2x1_vs_1x1": speed["1x1"] / speed["2x1"],
        "speedup_2x1_vs_1xall": speed[f"1x{cores}"] / speed["2x1"],
        "steps_per_block": args.bld_speed_steps,
        "seconds_include": "spawning the workers and loading the model in each",
    }
    results.save()


def selected_archs(args) -> dict:
    """The architectures ``--archs`` names (by the start of their label, e.g. "75%"); all by default."""
    if not args.archs:
        return dict(ARCHS)
    wanted = [w.strip() for w in args.archs.split(",") if w.strip()]
    chosen = {k: v for k, v in ARCHS.items() if any(k.startswith(w) for w in wanted)}
    if not chosen:
        raise SystemExit(f"--archs {args.archs!r} matches none of {list(ARCHS)}")
    return chosen


def refine_in_work(work: Path, imp, paths, sub, out: Path, cfg, parent=None):
    """Refine ``sub`` of ``parent`` (default: the importance-permuted model) on the benchmark's training
    text, distilled from the importance-permuted original through the teacher cache every recovery run
    shares (``WORK/teacher``); returns the refine record and the loaded model."""
    from compressor.elastic.modeldir import load_model
    from compressor.recovery.refine import refine

    record = refine(
        str(parent or imp),
        sub,
        str(paths["train"]),
        out,
        cfg,
        overwrite=True,
        log=lambda *_: None,
        teacher_cache_dir=work / "teacher",
        teacher=str(imp),
    )
    return record, load_model(str(out))


def run_refine(args, results, ev, imp, paths, method="refine"):
    """Repair, then train the one sub-network for its share of the budget: KD from the original
    ("refine") or plain cross-entropy with no teacher ("refine-ce"), at equal minutes. The budget is
    split over the selected architectures (``--archs``), so one selected arch gets all of it."""
    from compressor.recovery.refine import RefineConfig

    archs = selected_archs(args)
    per_arch = args.minutes / len(archs)
    for name, sub in archs.items():
        if results.has(method, name, per_arch):
            continue
        out = refine_dir(args, method, sub, per_arch)
        cfg = RefineConfig(
            minutes=per_arch,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=256,
            lr=args.lr,
            repair_tokens=args.repair_tokens,
            seed=args.seed,
            distill_alpha=0.0 if method == "refine-ce" else 1.0,
        )
        record, refined = refine_in_work(args.work, imp, paths, sub, out, cfg)
        results.add(
            method=method,
            arch=name,
            minutes=per_arch,
            params=sum(p.numel() for p in refined.model.parameters()),
            steps=record["training"]["steps"],
            tokens=record["training"]["tokens"],
            teacher_fill_s=round(float(record.get("teacher_fill_planned_seconds") or 0.0), 1),
            **ev.model(refined.model, with_mc=True),
        )


def run_retest(args, results, ev, imp, paths):
    """Adds the test texts a row lacks (rows stored before a test text existed), for the rows whose
    model can be had again without training: the original (and its INT8 engine), one-shot extractions,
    repairs (deterministic, re-solved) and every trained model whose output dir is still in ``--work``
    (refine, refine-ce). Other rows keep "–"."""
    from compressor.elastic.extract import extract
    from compressor.elastic.modeldir import load_model

    parent = load_model(str(imp))
    sn = parent.supernet()
    repair = None
    for row in results.data["rows"]:
        if all(name in row for name in ev.windows):
            continue
        model = None
        if row["method"] == "original int8 (ORT)":
            fp32 = next((r for r in results.data["rows"] if r["method"] == "original fp32"), {})
            missing = [name for name in ev.windows if name not in row and name in fp32]
            if missing:
                engine, ratio = int8_engine_ratios(args, ev, parent, missing)
                for name in missing:
                    row[name] = fp32[name] * ratio[name]
                    row.setdefault("int8_over_fp32", {})[name] = ratio[name]
                    for variant in engine:
                        row.setdefault("engine_ppl", {}).setdefault(variant, {})[name] = engine[variant][name]
                results.save()
                print("  retested original int8 (ORT): " + ", ".join(f"{n} {row[n]:.2f}" for n in missing))
            continue
        if row["method"] == "original fp32":
            model = parent.model
        elif row["method"] == "one-shot":
            model = extract(sn, ARCHS[row["arch"]])
        elif row["method"] == "repair":
            from compressor.recovery.repair import repair_model

            repair = repair or repair_setup(args, parent, paths)
            model, _ = repair_model(parent, ARCHS[row["arch"]], repair[1], repair[0])
        elif row["method"] in ("refine", "refine-ce"):
            out = refine_dir(args, row["method"], ARCHS[row["arch"]], row["minutes"])
            if (out / "nasprune.json").exists():
                model = load_model(str(out)).model
        if model is None:
            continue
        row.update(ev.model(model, with_mc=False, names=[name for name in ev.windows if name not in row]))
        results.save()
        print(f"  retested {row['method']} {row['arch']} {row['minutes']:.1f} min: narratives {row['narratives']:.2f}")


def run_references(args, results, ev, imp):
    """The original fp32 (torch), and the original's ONNX fp32 and dynamic-INT8 engines on a prefix."""

    from compressor.elastic.modeldir import load_model

    parent = load_model(str(imp))
    if not results.has("original fp32", "original", 0.0):
        results.add(
            method="original fp32",
            arch="original",
            minutes=0.0,
            params=sum(p.numel() for p in parent.model.parameters()),
            **ev.model(parent.model, with_mc=True),
        )
    if args.skip_int8 or results.has("original int8 (ORT)", "original", 0.0):
        return
    engine, ratio = int8_engine_ratios(args, ev, parent, list(ev.windows))
    torch_ppl = results.data["rows"][[r["method"] for r in results.data["rows"]].index("original fp32")]
    # the INT8 row is the fp32 torch perplexity times the engine's measured INT8/fp32 ratio on the prefix
    results.add(
        method="original int8 (ORT)",
        arch="original",
        minutes=0.0,
        params=torch_ppl["params"],
        engine_ppl=engine,
        int8_over_fp32=ratio,
        **{name: torch_ppl[name] * ratio[name] for name in ev.windows},
    )


def int8_engine_ratios(args, ev, parent, names) -> tuple[dict, dict]:
    """Perplexity of the original's ONNX fp32 and dynamic-INT8 engines on a prefix of each test text
    (``--engine-tokens``), and their ratio; the INT8 row is the fp32 torch perplexity times it."""
    import math as _math
    import tempfile

    from deploy.bundle import build_bundle, graph_paths
    from deploy.generate import OnnxGenerator, onnx_mean_nll

    sn = parent.supernet()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        bundle = build_bundle(
            parent, sn, sn.space.largest(), Path(tmp) / "original", variants=("fp32", "int8"), log=lambda *_: None
        )
        engine = {}
        for variant in ("fp32", "int8"):
            p = graph_paths(bundle, variant)
            gen = OnnxGenerator(p["prefill"], p["decode"])
            engine[variant] = {
                name: _math.exp(onnx_mean_nll(gen, ev.windows[name][:1, : args.engine_tokens].numpy()))
                for name in names
            }
    return engine, {name: engine["int8"][name] / engine["fp32"][name] for name in names}


# ---- report ----------------------------------------------------------------------------------
def report(results: Results, out_png: Path) -> None:
    rows = results.data["rows"]
    ref = next((r for r in rows if r["method"] == "original fp32"), None)
    print(
        "\n| method | arch | params | CPU min | persuasion ppl | x orig | narratives ppl | x orig "
        "| instruct ppl | x orig | MC acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mc = r.get("mc") or {}
        acc = " / ".join(f"{v:.3f}" for v in mc.values() if v is not None) or "–"
        xp = f"{r['persuasion'] / ref['persuasion']:.2f}" if ref else "–"
        xi = f"{r['instruct'] / ref['instruct']:.2f}" if ref else "–"
        nar = r.get("narratives")
        xn = f"{nar / ref['narratives']:.2f}" if nar and ref and ref.get("narratives") else "–"
        nar = f"{nar:.2f}" if nar else "–"
        print(
            f"| {r['method']} | {r['arch']} | {r['params'] / 1e6:.1f}M | {r['minutes']:.1f} "
            f"| {r['persuasion']:.2f} | {xp} | {nar} | {xn} "
            f"| {r['instruct']:.2f} | {xi} | {acc} |"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(ARCHS), figsize=(5 * len(ARCHS), 4), squeeze=False)
    for ax, arch in zip(axes[0], ARCHS):
        for method in ["one-shot", "repair", *SANDWICH, "refine", "refine-ce", "bld", "bld+kd"]:
            pts = sorted((r["minutes"], r["persuasion"]) for r in rows if r["method"] == method and r["arch"] == arch)
            if method in SANDWICH:
                base = [(0.0, r["persuasion"]) for r in rows if r["method"] == "one-shot" and r["arch"] == arch]
                pts = base + pts
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        if ref:
            ax.axhline(ref["persuasion"], color="k", ls="--", lw=1, label="original fp32")
            int8 = next((r for r in rows if r["method"] == "original int8 (ORT)"), None)
            if int8:
                ax.axhline(int8["persuasion"], color="grey", ls=":", lw=1, label="original INT8 (ORT)")
        ax.set_yscale("log")
        ax.set_title(arch)
        ax.set_xlabel("CPU minutes (2 cores)")
        ax.set_ylabel("test perplexity (Persuasion)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "recovery_work")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery.json")
    ap.add_argument("--importance", help="an importance-permuted model dir to reuse (default: computed in --work)")
    ap.add_argument("--minutes", type=float, default=10.0, help="budget per training method")
    ap.add_argument("--segments", type=int, default=2, help="evaluation points along each training run")
    ap.add_argument(
        "--methods",
        default="references,retest,one-shot,repair,sandwich-ce,sandwich-kd,inplace-kd,refine,refine-ce,bld,bld-speed",
    )
    ap.add_argument(
        "--archs", default="", help='refine only these architectures, by label prefix (e.g. "75%%"); default all'
    )
    ap.add_argument("--steps", type=int, default=120, help="cosine schedule length (the time budget stops first)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repair-tokens", type=int, default=4096)
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--engine-tokens", type=int, default=256, help="prefix for the ONNX engine perplexity")
    ap.add_argument("--mc-tasks", default="bb_sports_understanding,bb_navigate")
    ap.add_argument("--mc-limit", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--bld-steps", type=int, default=100, help="block-local distillation steps per block")
    ap.add_argument("--bld-processes", type=int, default=2)
    ap.add_argument("--bld-speed-steps", type=int, default=20)
    args = ap.parse_args()
    args.mc_tasks = [t for t in args.mc_tasks.split(",") if t]
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    paths = make_data(args.work)
    imp = importance_dir(args, paths)
    from compressor.elastic.modeldir import load_model

    ev = Evaluator(load_model(str(imp)).tokenizer, paths, args)
    results = Results(args.out)
    # Merged, not replaced: measurements stored in meta by earlier runs (bld_speed) must survive.
    results.data.setdefault("meta", {}).update(
        archs={k: v.to_dict() for k, v in ARCHS.items()},
        args={k: str(v) for k, v in vars(args).items()},
    )
    methods = args.methods.split(",")
    if "references" in methods:
        run_references(args, results, ev, imp)
    if "retest" in methods:
        run_retest(args, results, ev, imp, paths)
    if "one-shot" in methods:
        run_one_shot(args, results, ev, imp)
    if "repair" in methods:
        run_repair(args, results, ev, imp, paths)
    for method in SANDWICH:
        if method in methods:
            run_sandwich(args, results, ev, imp, paths, method)
    if "refine" in methods:
        run_refine(args, results, ev, imp, paths)
    if "refine-ce" in methods:
        run_refine(args, results, ev, imp, paths, method="refine-ce")
    if "bld" in methods:
        run_bld(args, results, ev, imp, paths)
    if "bld-speed" in methods:
        run_bld_speed(args, results, imp, paths)
    report(results, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
