"""Writing an importance-permuted model: weights, layer ranking and scores in one nasprune model dir."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from compressor.elastic.importance import ImportanceScores
from compressor.elastic.modeldir import LoadedModel, ModelMeta, save_model_dir, versions

SCORES_FILE = "importance.safetensors"


def save_importance(
    loaded: LoadedModel, scores: ImportanceScores, ranking: list[int], out: Path, overwrite: bool = False
) -> Path:
    """Scores are stored in the permuted order (descending inside every layer)."""
    tensors = {"embed": scores.embed.float(), "layers": scores.layers.float()}
    for i, (h, f) in enumerate(zip(scores.heads, scores.ffn)):
        tensors[f"heads.{i}"] = h.float().contiguous()
        tensors[f"ffn.{i}"] = f.float().contiguous()
    meta = ModelMeta(
        search_space=loaded.meta.search_space,
        layer_ranking=ranking,
        importance={**scores.info, "layer_scores": [float(x) for x in scores.layers], "scores_file": SCORES_FILE},
        provenance={
            **loaded.meta.provenance,
            "importance_from": str(loaded.path or loaded.source),
            "versions": versions(),
        },
    )
    meta.provenance.pop("created_at", None)
    return save_model_dir(
        loaded.model,
        loaded.tokenizer,
        meta,
        out,
        overwrite=overwrite,
        extra=lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / SCORES_FILE)),
    )
