"""Evaluation of the chosen models: the original, every bundle's checkpoint and its engines.

* perplexity on held-out text (torch, the plain HF checkpoint of each bundle);
* perplexity *through each quantized engine* on the same test windows: the bundle's weights
  exported as the full-logits graph and quantized by the very recipe its engine was built with
  (``compressor.quant.engine_quality``), so the cost of quantization is measured on what ships (the
  fp32 engine equals torch within the export's parity tolerance, so its perplexity is torch's);
* the one-shot baseline: the untrained pruned model (importance-permuted original) at each
  bundle's architecture, through the same engines — what pruning without nasprune's training
  would ship at the same latency;
* lm-eval tasks (standard names with --online, local multiple-choice jsonl files offline).

Results land in each bundle's manifest (``accuracy``) and in ``RUN/eval.json``.
"""

from __future__ import annotations

from pathlib import Path

from compressor.elastic.evaluate import hf_logits, lm_eval_tasks, perplexity, token_windows, write_local_tasks
from deploy.bundle import read_manifest, update_manifest


def evaluate_model(model, tokenizer, windows, cfg, task_dir: Path | None, task_names: list[str]) -> dict:
    out = {"ppl": perplexity(hf_logits(model.eval()), windows)}
    if task_names:
        out["tasks"] = lm_eval_tasks(model, tokenizer, task_names, task_dir, cfg.limit)
    return out


def engine_ppls(model, windows, variants, log=None, calibration=None) -> dict[str, float]:
    """Test perplexity through each quantized engine variant (fp32/fp16 are not quantized: skipped).
    ``calibration``: the windows static variants were calibrated on at export (the calibration text)."""
    from compressor.core.precisions import RECIPES
    from compressor.quant.engine_quality import engine_qualities

    quantized = [v for v in variants if v in RECIPES]
    measured = engine_qualities(model, windows, quantized, calibration=calibration)  # one export for all
    out = {v: q.ppl for v, q in measured.items()}
    for v, ppl in out.items():
        if log:
            log(f"    {v} engine: ppl {ppl:.2f}")
    return out


def evaluate_run(pipeline, cfg) -> dict:
    import tempfile

    from compressor.core.data import read_source, resolve_data
    from compressor.elastic.modeldir import load_model

    original = load_model(pipeline.model, online=pipeline.online)
    tok = original.tokenizer
    _, text = read_source(resolve_data(pipeline.cfg.data.test))
    windows = token_windows(tok, text, cfg.seq_len, cfg.ppl_tokens)
    calibration = _calibration_if_static(pipeline, tok)
    results = {
        "test": pipeline.cfg.data.test,
        "ppl_tokens": int(windows.numel()),
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
        one_shot_sn = None
        if Path(pipeline.importance_dir).is_dir():  # the untrained pruned model: the one-shot baseline
            one_shot_sn = load_model(str(pipeline.importance_dir)).supernet().eval()
        for bundle in sorted(Path(pipeline.bundles_dir).iterdir()):
            if not (bundle / "manifest.json").exists():
                continue
            pipeline.log(f"  evaluating {bundle.name}")
            manifest = read_manifest(bundle)
            loaded = load_model(str(bundle / "model"))
            acc = evaluate_model(loaded.model, loaded.tokenizer, windows, cfg, task_dir, names)
            quantized = engine_ppls(loaded.model, windows, manifest["engines"], calibration=calibration)
            acc["engine_ppl"] = {"fp32": acc["ppl"], **quantized}
            acc["params"] = manifest["params"]
            if not bundle.name.startswith("original") and one_shot_sn is not None:
                results.setdefault("one_shot", {})[bundle.name] = one_shot_of(
                    one_shot_sn, manifest, windows, pipeline.log, calibration
                )
            update_manifest(
                bundle,
                accuracy={
                    **acc,
                    "test": pipeline.cfg.data.test,
                    "ppl_tokens": int(windows.numel()),
                    "engine_ppl_tokens": int(windows.numel()),
                },
            )
            results["models"][bundle.name] = acc
            del loaded
    if cfg.rank_points:
        pipeline.log(f"  validation vs test ranking of up to {cfg.rank_points} searched sub-networks")
        results["validation_vs_test"] = rank_agreement(pipeline, tok, text, cfg)
    return results


def _calibration_if_static(pipeline, tokenizer):
    """The static recipes' calibration windows (as the export stage made them), if any bundle has one."""
    from compressor.core.data import resolve_data
    from compressor.core.precisions import needs_calibration
    from compressor.quant.quantize import static_calibration

    engines = set()
    for manifest in Path(pipeline.bundles_dir).glob("*/manifest.json"):
        engines |= set(read_manifest(manifest.parent)["engines"])
    if not any(needs_calibration(e) for e in engines if not e.startswith("tensorrt")):
        return None
    return static_calibration(tokenizer, resolve_data(pipeline.cfg.data.calibration), pipeline.online)


def one_shot_of(supernet, manifest: dict, windows, log=None, calibration=None) -> dict:
    """Test perplexity of the one-shot pruned model at a bundle's architecture, torch and every
    quantized engine variant of that bundle (same recipes, so same latency as the bundle's engines)."""
    from compressor.elastic.extract import extract
    from compressor.elastic.search_space import SubNetwork

    sub = SubNetwork.from_dict(manifest["arch"])
    model = extract(supernet, sub).eval()
    out = {"arch": manifest["arch"], "ppl": perplexity(hf_logits(model), windows)}
    quantized = engine_ppls(model, windows, manifest["engines"], calibration=calibration)
    out["engine_ppl"] = {"fp32": out["ppl"], **quantized}
    if log:
        log(f"    one-shot {sub}: ppl {out['ppl']:.2f}")
    return out


def rank_agreement(pipeline, tokenizer, test_text: str, cfg) -> dict:
    """Does the search's validation objective rank sub-networks like the test text does?

    Test loss through the trained super-network for the searched sub-networks (the Pareto front
    first, then other evaluated points), against the validation loss the search recorded; Kendall
    tau over them. A low tau means the validation text is too narrow to pick the right models."""
    import json

    from scipy.stats import kendalltau

    from compressor.elastic.evaluate import mean_loss
    from compressor.elastic.modeldir import load_model
    from compressor.elastic.search_space import SubNetwork

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
