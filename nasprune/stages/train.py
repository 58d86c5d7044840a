"""``train``: the super-network's sandwich-rule training (:mod:`compressor.recovery.train`) on
``data.train``, from the BLD weights when ``blocks`` ran, else the importance-permuted model
(``RUN/supernet``). The YAML ``train:`` section is handed to :meth:`TrainConfig.load` as it is."""

from __future__ import annotations

import json

from compressor.core.data import resolve_data
from nasprune.stages.base import Stage


def run(ctx) -> dict:
    from compressor.recovery.train import TrainConfig, run_training

    cfg = TrainConfig.load(None, ctx.cfg.train)
    resume = (ctx.run / "supernet.train" / "checkpoint.pt").exists()
    bld = ctx.stage_record("blocks").get("enabled", False) and ctx.blocks_dir.is_dir()
    original_teaches = bld and cfg.distill == "logits" and cfg.teacher == "original"
    run_training(
        str(ctx.blocks_dir if bld else ctx.importance_dir),
        resolve_data(ctx.cfg.data.train),
        ctx.supernet_dir,
        cfg,
        resume=resume,
        teacher_cache_dir=ctx.run / "teacher",
        online=ctx.online,
        log=ctx.log,
        overwrite=True,
        teacher=str(ctx.importance_dir) if original_teaches else None,  # KD from the original, not BLD's
    )
    meta = json.loads((ctx.supernet_dir / "nasprune.json").read_text())
    return {"training": {k: meta["provenance"]["training"][k] for k in ("steps", "seconds", "tokens")}}


STAGE = Stage(
    name="train",
    run=run,
    reads=("importance/", "blocks/ (when the blocks stage ran)", "data.train"),
    writes=("supernet/", "supernet.train/ (checkpoints)", "teacher/ (teacher logits cache)"),
    resumes="continues from supernet.train/checkpoint.pt exactly",
)
