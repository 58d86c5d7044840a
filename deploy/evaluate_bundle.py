"""Evaluation of the chosen models: the original, every bundle's checkpoint and its engines.

* perplexity on held-out text (torch, the plain HF checkpoint of each bundle);
* perplexity *through each engine* (fp32 and INT8 ONNX graphs, token by token) on a shorter
  prefix, so the cost of quantization is measured on what ships;
* lm-eval tasks (standard names with --online, local multiple-choice jsonl files offline).

Results land in each bundle's manifest (``accuracy``) and in ``RUN/eval.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from compressor.evaluate import hf_logits, lm_eval_tasks, perplexity, token_windows, write_local_tasks
from deploy.bundle import graph_paths, read_manifest, update_manifest


def evaluate_model(model, tokenizer, windows, cfg, task_dir: Path | None, task_names: list[str]) -> dict:
    out = {"ppl": perplexity(hf_logits(model.eval()), windows)}
    if task_names:
        out["tasks"] = lm_eval_tasks(model, tokenizer, task_names, task_dir, cfg.limit)
    return out


def engine_ppl(bundle: Path, variant: str, ids: np.ndarray) -> float:
    from deploy.generate import OnnxGenerator, onnx_mean_nll

    p = graph_paths(bundle, variant)
    return math.exp(onnx_mean_nll(OnnxGenerator(p["prefill"], p["decode"]), ids))


def evaluate_run(pipeline, cfg) -> dict:
    import tempfile

    from compressor.data import read_source, resolve_data
    from compressor.modeldir import load_model

    original = load_model(pipeline.model, online=pipeline.online)
    tok = original.tokenizer
    _, text = read_source(resolve_data(pipeline.cfg.data.test))
    windows = token_windows(tok, text, cfg.seq_len, cfg.ppl_tokens)
    onnx_ids = tok(text, return_tensors="np", add_special_tokens=False).input_ids[:, : cfg.onnx_ppl_tokens]
    results = {
        "test": pipeline.cfg.data.test,
        "ppl_tokens": int(windows.numel()),
        "onnx_ppl_tokens": int(onnx_ids.shape[1]),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = write_local_tasks([Path(resolve_data(f)) for f in cfg.task_files], Path(tmp)) if cfg.task_files else []
        names = list(cfg.tasks) + local
        task_dir = Path(tmp) if local else None
        pipeline.log("  evaluating the original model")
        results["models"]["original"] = {
            "params": sum(p.numel() for p in original.model.parameters()),
            **evaluate_model(original.model, tok, windows, cfg, task_dir, names),
        }
        del original
        for bundle in sorted(Path(pipeline.bundles_dir).iterdir()):
            if not (bundle / "manifest.json").exists():
                continue
            pipeline.log(f"  evaluating {bundle.name}")
            manifest = read_manifest(bundle)
            loaded = load_model(str(bundle / "model"))
            acc = evaluate_model(loaded.model, loaded.tokenizer, windows, cfg, task_dir, names)
            acc["engine_ppl"] = {
                v: engine_ppl(bundle, v, onnx_ids) for v in manifest["engines"] if v in ("fp32", "int8")
            }
            acc["params"] = manifest["params"]
            update_manifest(
                bundle,
                accuracy={
                    **acc,
                    "test": pipeline.cfg.data.test,
                    "ppl_tokens": int(windows.numel()),
                    "engine_ppl_tokens": int(onnx_ids.shape[1]),
                },
            )
            results["models"][bundle.name] = acc
    if cfg.rank_points:
        pipeline.log(f"  validation vs test ranking of up to {cfg.rank_points} searched sub-networks")
        results["validation_vs_test"] = rank_agreement(pipeline, tok, text, cfg)
    return results


def rank_agreement(pipeline, tokenizer, test_text: str, cfg) -> dict:
    """Does the search's validation objective rank sub-networks like the test text does?

    Test loss through the trained super-network for the searched sub-networks (the Pareto front
    first, then other evaluated points), against the validation loss the search recorded; Kendall
    tau over them. A low tau means the validation text is too narrow to pick the right models."""
    import json

    from scipy.stats import kendalltau

    from compressor.evaluate import mean_loss
    from compressor.modeldir import load_model
    from compressor.search_space import SubNetwork

    history = json.loads((Path(pipeline.search_dir) / "history.json").read_text())["evaluated"]
    front = json.loads((Path(pipeline.search_dir) / "pareto.json").read_text())["pareto"]
    rows, seen = [], set()
    for row in front + sorted(history, key=lambda r: r["params"]):
        key = json.dumps(row["arch"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    step = max(1, len(rows) // cfg.rank_points)
    rows = rows[::step][: cfg.rank_points]
    sn = load_model(str(pipeline.supernet_dir)).supernet().eval()
    windows = token_windows(tokenizer, test_text, cfg.seq_len, cfg.rank_tokens)
    points = []
    for row in rows:
        with sn.selected(SubNetwork.from_dict(row["arch"])):
            points.append(
                {
                    "arch": row["arch"],
                    "params": row["params"],
                    "validation_loss": row["loss"],
                    "test_loss": mean_loss(sn, windows),
                }
            )
    tau = (
        kendalltau([p["validation_loss"] for p in points], [p["test_loss"] for p in points]).statistic
        if len(points) > 2
        else float("nan")
    )
    return {"kendall_tau": float(tau), "n": len(points), "test_tokens": int(windows.numel()), "points": points}
