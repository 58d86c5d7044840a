"""``search``: NSGA-II over the trained super-network's validation quality and predicted latency
(:func:`search.driver.run_search_cli`, the same driver as ``nasprune search``), into ``RUN/search``."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.core.data import resolve_data
from nasprune.stages.base import Stage


@dataclass
class SearchStageConfig:
    workload: str = "prefill:1x128"  # or a weighted mix, "prefill:1x512 + 128*decode:1x512" (terms profiled)
    generations: int = 8
    population: int = 16
    eval_tokens: int = 4096
    seq_len: int = 256
    max_latency_ms: float | None = None
    max_params: int | None = None
    seed: int = 0
    # default: every profiled precision that measured faster than fp32 on this host (the precision gene)
    precisions: list[str] | None = None
    one_shot_baseline: bool = True  # score the untrained pruned model at the front's architectures too
    calibrate: bool = False  # re-measure the predictor's anchor first: predictions follow the machine's drift
    minutes: float | None = None  # wall-clock budget of the whole stage (baselines included): fewer generations


def run(ctx) -> dict:
    from compressor.elastic.modeldir import load_model
    from search.driver import run_search_cli, searched_precisions
    from search.problem import SearchConfig

    c = ctx.cfg.search
    # the decision ``nasprune search --store`` takes too: recipes no faster than fp32 here are left out
    precisions, slower = searched_precisions(
        list(ctx.cfg.profile.precisions), c.precisions, ctx.store, ctx.cfg.profile.engine, ctx.log
    )
    cfg = SearchConfig(
        population=c.population,
        generations=c.generations,
        seed=c.seed,
        max_latency_ms=c.max_latency_ms,
        max_params=c.max_params,
        precisions=precisions,
        max_minutes=c.minutes,
    )
    result = run_search_cli(
        load_model(str(ctx.supernet_dir)),
        list(ctx.predictor_dirs.values()),
        c.workload,
        resolve_data(ctx.cfg.data.validation),
        ctx.search_dir,
        cfg,
        c.eval_tokens,
        c.seq_len,
        overwrite=True,
        calibrate=c.calibrate,
        one_shot=load_model(str(ctx.importance_dir)) if c.one_shot_baseline else None,
        calibration_data=resolve_data(ctx.cfg.data.calibration),
    )
    return {
        "evaluated": len(result.evaluated),
        "pareto_points": len(result.pareto),
        "hypervolume": [result.hypervolume[0], result.hypervolume[-1]],
        "generations": len(result.hypervolume),
        "precisions": precisions,
        "not_faster_than_fp32": slower,
    }


STAGE = Stage(
    name="search",
    run=run,
    reads=("supernet/", "importance/ (one-shot baselines)", "predictor*/", "profiles.sqlite", "data.validation"),
    writes=("search/",),
)
