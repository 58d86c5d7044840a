"""The run's markdown report: Pareto plot, predicted vs measured latency, perplexity, accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from deploy.bundle import read_manifest


def _fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


BASELINE_PREFIX = "original"


def front_points(bundles: dict[str, dict], workload: str) -> list[dict]:
    """(name, variant, latency, test perplexity) of every measured engine of every bundle.

    fp32 uses the checkpoint's test perplexity; another variant scales it by that engine's measured
    perplexity ratio to the fp32 engine on the same tokens (the engines are scored on a shorter
    prefix, token by token), so quantization's cost is measured on what ships."""
    points = []
    for name, m in bundles.items():
        acc = m.get("accuracy", {})
        eng = acc.get("engine_ppl", {})
        for variant, per_workload in m.get("latency", {}).get("measured", {}).items():
            ms = per_workload.get(workload, {}).get("stats_ms", {}).get("median")
            ppl = acc.get("ppl")
            if variant != "fp32":
                ppl = ppl * eng[variant] / eng["fp32"] if ppl and eng.get(variant) and eng.get("fp32") else None
            if ms is not None and ppl is not None:
                points.append(
                    {
                        "name": name,
                        "variant": variant,
                        "ms": ms,
                        "ppl": ppl,
                        "baseline": name.startswith(BASELINE_PREFIX),
                    }
                )
    return points


def dominance(points: list[dict]) -> list[dict]:
    """For each baseline point, the nasprune points that dominate it (no slower, no worse, one strictly)."""
    ours = [p for p in points if not p["baseline"]]
    rows = []
    for b in (p for p in points if p["baseline"]):
        by = [
            f"{p['name']} {p['variant']}"
            for p in ours
            if p["ms"] <= b["ms"] and p["ppl"] <= b["ppl"] and (p["ms"] < b["ms"] or p["ppl"] < b["ppl"])
        ]
        rows.append({**b, "dominated_by": by})
    return rows


def write_report(pipeline) -> Path:
    run = Path(pipeline.run)
    state = pipeline.state
    pareto = json.loads((run / "search" / "pareto.json").read_text())
    evals = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {"models": {}}
    shutil.copy(run / "search" / "pareto.png", run / "pareto.png")
    lines = [
        f"# nasprune run: {pipeline.model}",
        "",
        f"Workload for search: `{pareto['workload']}`; predictor: `{pareto.get('predictor')}` "
        f"({pareto.get('predictor_group', {}).get('engine')}, {pareto.get('predictor_group', {}).get('precision')}).",
        "",
        "![Pareto front](pareto.png)",
        "",
        "## Pareto front (super-network quality vs predicted latency)",
        "",
        "| # | arch (e-h-f-l) | params | ppl (super-net) | predicted ms |",
        "|---|---|---|---|---|",
    ]
    orig = pareto.get("original")
    if orig:
        a = orig["arch"]
        lines.append(
            f"| original | {a['embed_dim']}-{a['num_heads']}-{a['ffn_dim']}-{a['num_layers']} "
            f"| {orig['params'] / 1e6:.1f}M "
            f"| {orig['ppl']:.2f} | {orig['predicted_ms']:.1f} |"
        )
    for i, r in enumerate(pareto["pareto"]):
        a = r["arch"]
        lines.append(
            f"| {i} | {a['embed_dim']}-{a['num_heads']}-{a['ffn_dim']}-{a['num_layers']} | {r['params'] / 1e6:.1f}M "
            f"| {r['ppl']:.2f} | {r['predicted_ms']:.1f} |"
        )
    lines += [
        "",
        "## Exported bundles",
        "",
        "| bundle | params | ppl (torch) | ppl fp32 engine | ppl int8 engine | predicted ms | measured fp32 ms "
        "| error | measured int8 ms |" + "".join(f" {t} |" for t in _task_names(evals)),
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(_task_names(evals)),
    ]
    o = evals["models"].get("original")
    if o:
        lines.append(
            f"| original | {o['params'] / 1e6:.1f}M | {o['ppl']:.2f} | – | – | – | – | – | – |"
            + "".join(f" {_acc(o, t)} |" for t in _task_names(evals))
        )
    bundles = run / "bundles"
    for b in sorted(bundles.iterdir()) if bundles.exists() else []:
        if not (b / "manifest.json").exists():
            continue
        m = read_manifest(b)
        w = pipeline.cfg.export.workloads[0]
        meas = m["latency"].get("measured", {})
        fp32 = meas.get("fp32", {}).get(w, {})
        int8 = meas.get("int8", {}).get(w, {})
        acc = m.get("accuracy", {})
        eng = acc.get("engine_ppl", {})
        lines.append(
            f"| {b.name} | {m['params'] / 1e6:.1f}M | {_fmt(acc.get('ppl'), '.2f')} | {_fmt(eng.get('fp32'), '.2f')} "
            f"| {_fmt(eng.get('int8'), '.2f')} | {_fmt(fp32.get('predicted_ms'))} "
            f"| {_fmt(fp32.get('stats_ms', {}).get('median'))} | {_fmt(fp32.get('error'), '+.1%')} "
            f"| {_fmt(int8.get('stats_ms', {}).get('median'))} |"
            + "".join(f" {_acc(acc, t)} |" for t in _task_names(evals))
        )
    w = pipeline.cfg.export.workloads[0]
    manifests = {}
    for b in sorted(bundles.iterdir()) if bundles.exists() else []:
        if (b / "manifest.json").is_file():
            manifests[b.name] = read_manifest(b)
    rows = dominance(front_points(manifests, w))
    if rows:
        lines += [
            "",
            "## Does the front beat what the user would do instead?",
            "",
            f"The original model at each engine precision, against every exported nasprune point (`{w}`, measured; "
            "test perplexity, INT8 scaled by its engine's measured ratio to fp32 on the same tokens):",
            "",
            "| baseline | measured ms | test ppl | dominated by |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['name']} {r['variant']} | {r['ms']:.1f} | {r['ppl']:.2f} | "
            f"{', '.join(r['dominated_by']) or '**no nasprune point** (not dominated)'} |"
            for r in rows
        ]
    refine = state["stages"].get("refine", {}).get("points")
    if refine:
        lines += [
            "",
            "## Refine (validation perplexity, before and after)",
            "",
            "| point | one-shot | repaired | refined | steps |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {_fmt(r.get('ppl_one_shot'), '.2f')} | {_fmt(r.get('ppl_repaired'), '.2f')} "
            f"| {_fmt(r.get('ppl_refined'), '.2f')} | {(r.get('training') or {}).get('steps', '–')} |"
            for name, r in refine.items()
        ]
    agree = evals.get("validation_vs_test")
    if agree:
        lines += [
            "",
            f"Validation objective vs test loss over {agree['n']} searched sub-networks: Kendall tau "
            f"{agree['kendall_tau']:.3f} (1 = the search ranks exactly as the test text would).",
        ]
    lines += [
        "",
        f"Perplexity on `{evals.get('test')}` ({evals.get('ppl_tokens')} tokens; engines token by token on "
        f"the first {evals.get('onnx_ppl_tokens')}). Latency: median, `{pipeline.cfg.export.workloads[0]}`, "
        f"{pipeline.cfg.export.threads} thread(s), this machine.",
        "",
        "## Stage times",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {s} | {v['seconds']} |" for s, v in state["stages"].items()]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _task_names(evals) -> list[str]:
    names = []
    for m in evals["models"].values():
        for t in m.get("tasks", {}):
            if t not in names:
                names.append(t)
    return names


def _acc(model: dict, task: str) -> str:
    t = model.get("tasks", {}).get(task, {})
    return _fmt(t.get("acc"), ".3f")
