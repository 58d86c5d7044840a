"""``blocks``: block-local distillation (:mod:`compressor.recovery.bld`) of the importance-permuted
super-network on ``data.calibration`` before ``train`` (``RUN/blocks``); off by default."""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.core.data import resolve_data
from compressor.recovery.bld import BlockDistillConfig
from nasprune.stages.base import Stage


@dataclass
class BlocksStageConfig:
    """The YAML ``blocks:`` section: ``enabled`` plus every :class:`BlockDistillConfig` setting, flat.
    Every width of every block learns the original block's output from cached teacher activations;
    ``train`` then starts from those weights (its KD teacher stays the original). Off by default."""

    enabled: bool = False
    config: BlockDistillConfig = field(default_factory=BlockDistillConfig)

    NESTED = "config"  # the field holding the algorithm's config (its settings sit flat in the YAML)
    FIXED = ()  # algorithm settings the stage decides itself (not settable in the YAML)


def run(ctx) -> dict:
    """BLD of the permuted super-network (skipped unless ``blocks: enabled: true``)."""
    if not ctx.cfg.blocks.enabled:
        return {"enabled": False}
    from compressor.recovery.bld import distill_blocks_to

    _, report = distill_blocks_to(
        str(ctx.importance_dir),
        resolve_data(ctx.cfg.data.calibration),
        ctx.blocks_dir,
        ctx.cfg.blocks.config,
        online=ctx.online,
        log=ctx.log,
        overwrite=True,
    )
    worst = max(report["blocks"], key=lambda r: r["loss_last"])
    ctx.log(f"  {len(report['blocks'])} blocks in {report['seconds']:.0f}s; worst block {worst['layer']}")
    return {"enabled": True, "bld_seconds": report["seconds"], "blocks": report["blocks"]}


STAGE = Stage(
    name="blocks",
    run=run,
    reads=("importance/", "data.calibration"),
    writes=("blocks/", "blocks.blocks/ (teacher activations, work dir)"),
    resumes="reuses the cached teacher activations of its work dir",
)
