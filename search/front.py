"""The search's outputs: pareto.json, pareto.csv, history.json and pareto.png of a ``SearchResult``.

Baselines (what the user would do instead, scored by the same objectives) are listed with the front
points that dominate each one, by the one rule of ``search.dominance`` on (loss, predicted latency):
predictions are exact numbers, so no latency tolerance.
"""

from __future__ import annotations

import math
from dataclasses import asdict

from compressor.core.workload import Workload
from compressor.elastic.search_space import SearchSpace, SubNetwork
from search.dominance import dominates
from search.results import Evaluated, SearchResult


def write_results(
    result: SearchResult,
    out,
    space: SearchSpace,
    workload: Workload,
    original: Evaluated | None,
    extra: dict | None = None,
    overwrite: bool = False,
    baselines: dict[str, Evaluated] | None = None,
) -> None:
    """pareto.json + pareto.csv + history.json + pareto.png in ``out``, written atomically under the
    ownership rule (an existing search output is replaced only with ``overwrite``).

    ``baselines``: what the user would do instead (e.g. the original model at each precision),
    scored by the same objectives; pareto.json lists them with the front points that dominate
    each one, and the plot shows them."""
    from pathlib import Path

    from compressor.elastic.modeldir import atomic_dir_write

    atomic_dir_write(
        Path(out),
        lambda tmp: _write_search_files(result, tmp, space, workload, original, extra, baselines or {}),
        "search",
        overwrite,
    )


def baseline_rows(front: list[Evaluated], baselines: dict[str, Evaluated]) -> list[dict]:
    return [
        {
            "label": label,
            **b.row(),
            "dominated_by": [
                i for i, p in enumerate(front) if dominates(p.loss, p.predicted_ms, b.loss, b.predicted_ms)
            ],
        }
        for label, b in baselines.items()
    ]


def _write_search_files(
    result: SearchResult,
    out,
    space: SearchSpace,
    workload: Workload,
    original: Evaluated | None,
    extra: dict | None,
    baselines: dict[str, Evaluated] | None = None,
) -> None:
    import csv

    from compressor.elastic.modeldir import write_json_atomic

    rows = [p.row() for p in result.pareto]
    for r in rows:
        r["num_kv_heads"] = space.num_kv_heads(SubNetwork.from_dict(r["arch"]))
    write_json_atomic(
        out / "pareto.json",
        {
            "workload": str(workload),
            "config": asdict(result.config),
            "pareto": rows,
            "original": original.row() if original else None,
            "baselines": baseline_rows(result.pareto, baselines or {}),
            **(extra or {}),
        },
    )
    with open(out / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "index",
                "embed_dim",
                "num_heads",
                "num_kv_heads",
                "ffn_dim",
                "num_layers",
                "precision",
                "params",
                "loss",
                "ppl",
                "predicted_ms",
            ]
        )
        for i, r in enumerate(rows):
            a = r["arch"]
            w.writerow(
                [
                    i,
                    a["embed_dim"],
                    a["num_heads"],
                    r["num_kv_heads"],
                    a["ffn_dim"],
                    a["num_layers"],
                    r.get("precision", ""),
                    r["params"],
                    f"{r['loss']:.5f}",
                    f"{r['ppl']:.3f}",
                    f"{r['predicted_ms']:.3f}",
                ]
            )
    write_json_atomic(
        out / "history.json",
        {
            "hypervolume": result.hypervolume,
            "reference_point": result.reference_point,
            "seconds": result.seconds,
            "evaluated": [e.row() for e in result.evaluated],
        },
    )
    plot_front(result, original, out / "pareto.png", workload, baselines)


def plot_front(
    result: SearchResult,
    original: Evaluated | None,
    path,
    workload: Workload,
    baselines: dict[str, Evaluated] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ev = result.evaluated
    ax.scatter([e.predicted_ms for e in ev], [math.exp(e.loss) for e in ev], s=10, c="lightgray", label="evaluated")
    front = result.pareto
    ax.plot(
        [e.predicted_ms for e in front], [math.exp(e.loss) for e in front], "o-", c="tab:blue", label="Pareto front"
    )
    for i, e in enumerate(front):
        label = str(i) if e.precision is None else f"{i} {e.precision}"
        ax.annotate(label, (e.predicted_ms, math.exp(e.loss)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    originals = {k: b for k, b in (baselines or {}).items() if not k.startswith("one-shot")}
    one_shot = [b for k, b in (baselines or {}).items() if k.startswith("one-shot")]
    for label, b in originals.items():
        ax.scatter([b.predicted_ms], [math.exp(b.loss)], marker="X", s=80, c="tab:orange")
        ax.annotate(label, (b.predicted_ms, math.exp(b.loss)), fontsize=7, xytext=(4, -9), textcoords="offset points")
    if originals:
        ax.scatter([], [], marker="X", s=80, c="tab:orange", label="original model at each precision")
    if one_shot:
        ax.scatter(
            [b.predicted_ms for b in one_shot],
            [math.exp(b.loss) for b in one_shot],
            marker="v",
            s=25,
            c="tab:gray",
            label="one-shot pruning (no training), same architectures",
        )
    if original is not None and not baselines:
        ax.scatter(
            [original.predicted_ms],
            [math.exp(original.loss)],
            marker="*",
            s=150,
            c="tab:red",
            label="full model (largest sub-network)",
        )
    ax.set_yscale("log")
    ax.set_xlabel(f"predicted latency, {workload} (ms)")
    ax.set_ylabel("perplexity (super-network, held out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
