"""``report``: ``RUN/report.md`` (and its figures and ``front.json``) from everything the run wrote
(:func:`deploy.report.write_report`)."""

from __future__ import annotations

from nasprune.stages.base import Stage


def run(ctx) -> dict:
    from deploy.report import write_report

    path = write_report(ctx)
    ctx.log(f"  report: {path}")
    return {"report": str(path)}


STAGE = Stage(
    name="report",
    run=run,
    reads=("run.json", "eval.json", "search/", "bundles/"),
    writes=("report.md", "pareto.png", "front.json"),
)
