"""After a ``nasprune compress`` run: does nasprune's front beat what the user would do instead?

Reads ``RUN/front.json`` (written by the report stage: every exported bundle's engine variants with
measured latency and test perplexity through that engine, the original model's bundle at every
precision, and one-shot pruning at each exported architecture) and compares three fronts on the
test text and the export workload:

* nasprune: the exported points (pruned + trained + refined, each engine precision);
* original: the unpruned model at every precision (what a user gets from quantizing alone);
* one-shot: pruning without training at the same architectures and precisions;
* and "original + nasprune", to see what nasprune adds to the user's options.

Hypervolume (larger is better) in (latency ms, test loss = ln perplexity), with one reference point
for all fronts: 1.05 x the worst latency and loss of the *original* baselines, so a point only
counts where it is at least as fast and as good as the worst thing the user already has.

    python benchmarks/front_vs_baselines.py [--run runs/demo]

Prints the table, writes benchmarks/results/front_vs_baselines.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from deploy.report import fastest_within


def objectives(points: list[dict]) -> np.ndarray:
    return np.array([[p["ms"], math.log(p["ppl"])] for p in points], dtype=float).reshape(-1, 2)


def front_of(points: list[dict]) -> list[dict]:
    if not points:
        return []
    idx = NonDominatedSorting().do(objectives(points), only_non_dominated_front=True)
    return sorted((points[i] for i in idx), key=lambda p: p["ms"])


def hypervolume(points: list[dict], ref: np.ndarray) -> float:
    f = objectives(front_of(points))
    f = f[(f < ref).all(axis=1)]
    return float(HV(ref_point=ref)(f)) if len(f) else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "front_vs_baselines.json"))
    args = ap.parse_args()
    path = Path(args.run) / "front.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; run `nasprune compress` (its report stage writes it)")
    data = json.loads(path.read_text())
    points = data["points"]
    groups = {
        "nasprune": [p for p in points if p["kind"] == "nasprune"],
        "original": [p for p in points if p["kind"] == "original"],
        "one-shot": [p for p in points if p["kind"] == "one-shot"],
    }
    groups["original + nasprune"] = groups["original"] + groups["nasprune"]
    if not groups["original"]:
        raise SystemExit("error: the run has no original-model baseline bundles (export.baseline: true)")
    worst = objectives(groups["original"]).max(axis=0)
    ref = worst * np.array([1.05, 1.05])
    hv = {k: hypervolume(v, ref) for k, v in groups.items()}
    print(f"run {args.run}, workload {data['workload']}; reference point {ref[0]:.1f} ms, ppl {math.exp(ref[1]):.1f}")
    print("\n| front | points | non-dominated | hypervolume | vs original |")
    print("|---|---|---|---|---|")
    for k, v in groups.items():
        rel = f"{hv[k] / hv['original']:.2f}x" if hv["original"] else "–"
        print(f"| {k} | {len(v)} | {len(front_of(v))} | {hv[k]:.2f} | {rel} |")
    print("\n| baseline | variant | ms | test ppl | dominated by |")
    print("|---|---|---|---|---|")
    for r in data["dominance"]:
        by = ", ".join(r["dominated_by"]) or "—"
        print(f"| {r['name']} | {r['variant']} | {r['ms']:.1f} | {r['ppl']:.2f} | {by} |")
    originals = [r for r in data["dominance"] if r["kind"] == "original"]
    beaten = [r for r in originals if r["dominated_by"]]
    print(f"\noriginal-model baselines dominated by a nasprune point: {len(beaten)} of {len(originals)}")
    budgets = fastest_within(points)  # from the points, so runs written before the report kept it work too
    print("\n| quality budget | nasprune: fastest within it | speed-up | original quantized only | speed-up |")
    print("|---|---|---|---|---|")
    for b in budgets:
        cells = [
            (f"{p['name']} {p['variant']} ({p['ppl']:.2f}, {p['ms']:.1f} ms)", f"{p['speedup']:.2f}x")
            if p
            else ("–", "–")
            for p in (b["nasprune"], b["original"])
        ]
        print(f"| <= {b['budget']:g}x ({b['max_ppl']:.2f}) | " + " | ".join(c for pair in cells for c in pair) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "run": str(args.run),
                "workload": data["workload"],
                "reference_point": {"ms": ref[0], "loss": ref[1]},
                "hypervolume": hv,
                "fronts": {k: front_of(v) for k, v in groups.items()},
                "dominance": data["dominance"],
                "original_dominated": f"{len(beaten)} of {len(originals)}",
                "fastest_within": budgets,
            },
            indent=1,
        )
    )
    plot(groups, out.with_suffix(".png"), data["workload"])
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(groups: dict, path: Path, workload: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"nasprune": ("o-", "tab:blue"), "original": ("X--", "tab:orange"), "one-shot": ("v:", "tab:gray")}
    for kind, (style, color) in styles.items():
        pts = groups[kind]
        ax.scatter([p["ms"] for p in pts], [p["ppl"] for p in pts], c=color, s=14, alpha=0.5)
        front = front_of(pts)
        ax.plot([p["ms"] for p in front], [p["ppl"] for p in front], style, c=color, label=f"{kind} front")
        for p in pts:
            ax.annotate(p["variant"], (p["ms"], p["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel(f"measured latency, {workload} (ms)")
    ax.set_ylabel("test perplexity through the engine")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
