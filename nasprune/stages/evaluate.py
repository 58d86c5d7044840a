"""``evaluate``: every bundle (and the original, and the one-shot baselines) on the test text, which
nothing before this stage reads (``RUN/eval.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.elastic.modeldir import write_json_atomic
from nasprune.stages.base import Stage


@dataclass
class EvalConfig:
    ppl_tokens: int = 8192
    seq_len: int = 256
    tasks: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)
    limit: int | None = 50
    rank_points: int = 12  # searched sub-networks scored on test text to check the validation ranking (0: skip)
    rank_tokens: int = 2048


def run(ctx) -> dict:
    from deploy.evaluate_bundle import evaluate_run

    results = evaluate_run(ctx, ctx.cfg.evaluate)
    write_json_atomic(ctx.run / "eval.json", results)
    return {"models": len(results["models"])}


STAGE = Stage(
    name="evaluate",
    run=run,
    reads=("bundles/", "importance/", "supernet/", "search/", "data.test"),
    writes=("eval.json",),
)
