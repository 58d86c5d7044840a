"""``importance``: score heads, neurons, channels and layers of the model on ``data.calibration`` and
save it permuted so that "first k" means "most important k" (``RUN/importance``)."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.core.data import resolve_data
from nasprune.stages.base import Stage


@dataclass
class ImportanceConfig:
    tokens: int = 32768
    layer_tokens: int = 4096
    layer_metric: str = "drop-loss"
    seq_len: int = 512
    batch_size: int = 8


def run(ctx) -> dict:
    from compressor.core.data import load_data
    from compressor.elastic.importance import compute_importance, layer_ranking, permute
    from compressor.elastic.importance_io import save_importance
    from compressor.elastic.modeldir import load_model

    c = ctx.cfg.importance
    loaded = load_model(ctx.model, online=ctx.online)
    calib = load_data(loaded.tokenizer, resolve_data(ctx.cfg.data.calibration), c.seq_len, c.tokens, ctx.online)
    sn = loaded.supernet()
    scores = compute_importance(
        sn, calib, calib.subset(slice(0, max(1, c.layer_tokens // c.seq_len))), c.layer_metric, c.batch_size
    )
    ranking = layer_ranking(scores)
    save_importance(loaded, permute(sn, scores), ranking, ctx.importance_dir, overwrite=True)
    return {"layer_ranking": ranking, "importance_seconds": scores.info["seconds_total"]}


STAGE = Stage(
    name="importance",
    run=run,
    reads=("MODEL", "data.calibration"),
    writes=("importance/",),
)
