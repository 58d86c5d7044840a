"""``refine``: each point that will be exported is distilled on its own from the original
(:func:`compressor.recovery.refine.refine`, the same function as ``nasprune refine``), into
``RUN/refined/<name>-<arch>``; ``enabled: false`` ships the super-network's weights as they are."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from compressor.core.data import resolve_data
from compressor.recovery.refine import RefineConfig
from nasprune.stages.base import Stage


@dataclass
class RefineStageConfig:
    """The YAML ``refine:`` section: the stage's own two settings plus every :class:`RefineConfig`
    setting (``minutes`` per point, ``batch_size``, ``lr``, ``warmup_steps``, ``block_lr``, ...), flat.
    Validation tokens (``eval_tokens``) of each before/after perplexity (up to five per point: one-shot,
    repaired, refined, and both quantized) dominate the stage on a slow CPU, not training."""

    enabled: bool = True
    # a point the search chose at a quantization recipe is refined with that recipe simulated in the
    # forward (straight-through rounding): its weights learn to survive the engine's quantization
    quantization_aware: bool = True
    config: RefineConfig = field(default_factory=RefineConfig)

    NESTED = "config"  # the field holding the algorithm's config (its settings sit flat in the YAML)
    FIXED = ("quantization",)  # chosen per point (qat_recipe of the point's precision), not in the YAML


RECORD_KEYS = (
    "ppl_one_shot",
    "ppl_repaired",
    "ppl_refined",
    "ppl_one_shot_quantized",
    "ppl_refined_quantized",
    "training",
)


def run(ctx) -> dict:
    """Distil each point that will be exported on its own (repair first); quality before/after on
    the validation text (the test text stays unread until the evaluate stage)."""
    c = ctx.cfg.refine
    if not c.enabled:
        ctx.log("  refine disabled: exporting the super-network's weights")
        return {"enabled": False}
    from compressor.recovery.refine import qat_recipe, refine

    records = {}
    for name, sub, row in ctx.picks():
        # static recipes are calibrated on the refined weights at export: their points train in float
        qat = qat_recipe((row or {}).get("precision") or "fp32", c.quantization_aware)
        how = f", {qat} simulated" if qat else ""
        ctx.log(f"  refining {sub} for {c.config.minutes:g} min{how}")
        resume = (ctx.refined_dir / f"{name}-{sub}.train" / "checkpoint.pt").exists()
        rec = refine(
            str(ctx.supernet_dir),
            sub,
            resolve_data(ctx.cfg.data.train),
            ctx.refined_dir / f"{name}-{sub}",
            replace(c.config, quantization=qat),
            validation=resolve_data(ctx.cfg.data.validation),
            online=ctx.online,
            resume=resume,
            overwrite=True,
            log=lambda *_: None,
            teacher=str(ctx.importance_dir),
            teacher_cache_dir=ctx.run / "teacher",
        )
        shown = ", ".join(
            f"{k.removeprefix('ppl_')} {rec[k]:.2f}"
            for k in ("ppl_one_shot", "ppl_repaired", "ppl_refined")
            if rec.get(k)
        )
        ctx.log(f"    validation perplexity {shown} ({rec['training']['steps']} steps)")
        records[f"{name}-{sub}"] = {k: rec.get(k) for k in RECORD_KEYS}
        records[f"{name}-{sub}"]["quantization"] = qat
    return {"enabled": True, "points": records}


STAGE = Stage(
    name="refine",
    run=run,
    reads=("search/pareto.json", "supernet/", "importance/ (the teacher)", "data.train", "data.validation"),
    writes=("refined/<p>/", "refined/<p>.student/", "refined/<p>.train/", "teacher/"),
    resumes="a point with a checkpoint in refined/<p>.train continues it, keeping the step plan it started with",
)
