"""Measured-vs-predicted scatter (log-log, ±10% band), the picture nn-Meter papers show."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def measured_vs_predicted_png(
    path: Path, measured, predicted, labels: Sequence[str] | None = None, title: str = ""
) -> Path:
    """Write the plot; ``labels`` (e.g. workload per sample) colours the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from predictors.metrics import summarize

    m = np.asarray(measured, dtype=float)
    p = np.asarray(predicted, dtype=float)
    labels = list(labels) if labels is not None else [""] * len(m)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        ax.scatter(m[idx], p[idx], s=14, alpha=0.8, label=label or None)
    lo, hi = min(m.min(), p.min()) * 0.9, max(m.max(), p.max()) * 1.1
    line = np.geomspace(lo, hi, 50)
    ax.plot(line, line, "k-", lw=1)
    ax.fill_between(line, line * 0.9, line * 1.1, color="grey", alpha=0.2, label="±10%")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        ax.set_xscale("log") if axis is ax.xaxis else ax.set_yscale("log")
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())  # log minor labels overlap on a 1-2 decade range
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured median latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    s = summarize(m, p)
    ax.set_title(
        (title + "\n" if title else "")
        + f"MAPE {s['mape']:.2f}%  ±10% acc {s['acc10']:.1%}  τ {s['kendall_tau']:.3f}  (n={s['n']})",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
