"""``export``: engine bundles of the chosen front points (refined, or repaired at export, or as the
super-network has them) and of the unpruned original, verified on this host (``RUN/bundles``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor.core.data import resolve_data
from nasprune.stages.base import Stage


@dataclass
class ExportConfig:
    points: int = 3
    # engine variants of every exported point, plus the precision the search chose for it
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    # the original's variants (plus every profiled precision): the user's alternatives, e.g. plain int8
    baseline_precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    verify: bool = True
    workloads: list[str] = field(default_factory=lambda: ["prefill:1x128"])  # workloads or mixes; first: report's
    threads: int = 1
    # also export the unpruned original at every precision: the user's alternative, measured the same way
    baseline: bool = True
    # closed-form repair (compressor/recovery/repair.py) of each exported point on data.calibration, perplexity
    # before/after on data.validation in the manifest; points the refine stage refined are never
    # repaired again (refine repairs before training; the manifest says so)
    repair: bool = False
    repair_tokens: int = 4096
    repair_eval_tokens: int = 2048
    # pick the points among the front's points whose validation perplexity (search) is <= this x the
    # original's (at least ``points`` of them: the lowest-perplexity ones when fewer qualify); None: the
    # whole front. The front's fast end (e.g. a 22M model at 30x the original's perplexity) is no
    # alternative to the original at any precision: refining and shipping it spends minutes on nothing
    max_ppl_ratio: float | None = None
    # quality budgets instead of ``points``/``max_ppl_ratio``: for each ratio r, ship the fastest front point
    # (any searched precision) whose validation perplexity is <= r x the original's: "the fastest model
    # within 1.3x of the original" is the question a user with a latency target asks. The search scores
    # the super-network's weights before refine, which takes 1.2-1.5x off, so a budget is conservative
    targets: list[float] | None = None


def export_variants(ctx, picks=None) -> list[str]:
    """Engine variants of the bundles: the configured ones plus every precision the exported points
    were chosen at (``picks`` None: the original baseline, at every profiled precision too)."""
    if picks is None:
        return list(dict.fromkeys([*ctx.cfg.export.baseline_precisions, *ctx.cfg.profile.precisions]))
    chosen = [row.get("precision") for _, _, row in picks if row]
    return list(dict.fromkeys([*ctx.cfg.export.precisions, *(p for p in chosen if p)]))


def _bundles(ctx, loaded, picks, variants, **kw) -> list[Path]:
    """:func:`deploy.pipeline_steps.export_bundles` of ``picks`` with the run's export settings."""
    from deploy.pipeline_steps import export_bundles

    c = ctx.cfg.export
    return export_bundles(
        loaded,
        picks,
        ctx.bundles_dir,
        variants,
        list(ctx.predictor_dirs.values()),
        c.workloads,
        c.verify,
        c.threads,
        log=ctx.log,
        overwrite=True,
        calibration_data=resolve_data(ctx.cfg.data.calibration),
        **kw,
    )


def run(ctx) -> dict:
    from compressor.elastic.modeldir import load_model

    c = ctx.cfg.export
    picks = ctx.picks()
    refined = ctx.cfg.refine.enabled and ctx.stage_record("refine").get("enabled", False)
    baseline = []
    if c.baseline:  # the original (permuted: same function) as a bundle at every precision, name "original-..."
        original = load_model(str(ctx.importance_dir))
        largest = original.supernet().space.largest()
        baseline = _bundles(ctx, original, [("original", largest, None)], export_variants(ctx, None))
        del original
    if not refined:
        paths = _export_unrefined(ctx, picks)
        repair = "at export" if c.repair else "off"
    else:
        paths = []
        for name, sub, row in picks:  # each refined model is a standalone checkpoint whose largest is ``sub``
            directory = ctx.refined_dir / f"{name}-{sub}"
            note = refined_repair_note(ctx, directory)
            paths += _bundles(
                ctx,
                load_model(str(directory)),
                [(name, sub, row)],
                export_variants(ctx, [(name, sub, row)]),
                repair=lambda _sub, note=note: (None, note),
            )
        repair = "before refine" if ctx.cfg.refine.config.repair else "off"
    return {
        "bundles": [str(p) for p in paths],
        "baseline": [str(p) for p in baseline],
        "refined": bool(refined),
        "repair": repair,
    }


def _export_unrefined(ctx, picks) -> list[Path]:
    """The points with the super-network's weights, repaired at export when ``export.repair``."""
    from compressor.elastic.modeldir import load_model

    c = ctx.cfg.export
    supernet, fix = load_model(str(ctx.supernet_dir)), None
    if c.repair:  # targets from the original (same permutation), never the trained super-network
        from deploy.pipeline_steps import repair_for_export

        fix = repair_for_export(
            supernet,
            resolve_data(ctx.cfg.data.calibration),
            c.repair_tokens,
            resolve_data(ctx.cfg.data.validation),
            c.repair_eval_tokens,
            ctx.online,
            teacher=load_model(str(ctx.importance_dir)),
            log=ctx.log,
        )
    return _bundles(ctx, supernet, picks, export_variants(ctx, picks), repair=fix)


def refined_repair_note(ctx, directory: Path) -> dict:
    """The manifest's ``repair`` section of a refined point: refine repaired it (or not) before its
    training, so export never repairs it again (the refined weights are no longer the pruned ones
    the closed form corrects)."""
    from compressor.elastic.modeldir import ModelMeta

    rec = (ModelMeta.read(directory).subnetwork or {}).get("refine", {})
    repaired = bool((rec.get("config") or {}).get("repair"))
    return {
        "applied": "before refine" if repaired else "none (refine ran without repair)",
        "data": rec.get("data") if repaired else None,
        "ppl_before": rec.get("ppl_one_shot"),
        "ppl_after": rec.get("ppl_repaired"),
        "ppl_refined": rec.get("ppl_refined"),
        "ppl_on": rec.get("validation"),
        "note": "not repaired at export: the refine stage owns this point's repair"
        + ("" if not ctx.cfg.export.repair else " (export.repair ignored for refined points)"),
    }


STAGE = Stage(
    name="export",
    run=run,
    reads=("search/pareto.json", "refined/<p>/ or supernet/", "importance/ (the original)", "predictor*/"),
    writes=("bundles/<p>/", "bundles/original-*/"),
)
