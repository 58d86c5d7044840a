"""The profiled model's search space, stored in the predictor so features can be rebuilt anywhere.

Why the manifest carries the HF config dict (plus search-space settings and layer ranking)
rather than a path to the model: a predictor is used by the search stage, in CI and on other
machines, where the profiled checkpoint may not exist. ``SearchSpace.from_config`` rebuilds the
exact parameter/FLOP/byte counts from the config alone (meta device, no weights read).
"""

from __future__ import annotations

from pathlib import Path

from compressor.core.errors import NaspruneError
from compressor.elastic.search_space import SearchSpace, SearchSpaceConfig


def describe_model(spec: str, online: bool = False) -> dict:
    """``{"hf_config", "space_config", "layer_ranking"}`` for MODEL (dir, .gguf, hub id or 'default').

    A directory (or ``default``, once converted) is read without loading weights.
    """
    from compressor.elastic.modeldir import ModelMeta, default_model_dir, load_model, read_config

    path = default_model_dir() if spec == "default" else Path(spec).expanduser()
    if path.is_dir():
        config = read_config(path, hint="pass the profiled model")
        meta = ModelMeta.read(path)
    else:
        loaded = load_model(spec, online=online)
        config, meta = loaded.model.config, loaded.meta
    return {
        "hf_config": config.to_dict(),
        "space_config": dict(meta.search_space or {}),
        "layer_ranking": meta.layer_ranking,
    }


def resolve_source(source: str | None) -> str:
    """MODEL spec for a record's ``model.source``.

    The profiler records the model's provenance (for ``default``: the PyPI package and GGUF it
    was converted from), which is not itself a MODEL argument; it maps back to ``default`` when
    it names the converted default model in the cache, and to itself when it is an existing path.
    """
    from compressor.elastic.modeldir import DEFAULT_NAME, ModelMeta, cache_dir

    if source and Path(source).expanduser().exists():
        return source
    default = cache_dir() / "models" / DEFAULT_NAME
    if source and source == ModelMeta.read(default).provenance.get("source"):
        return "default"
    raise NaspruneError(
        f"the records' model '{source}' is not a path on this machine; pass the profiled model with --model"
    )


def space_from_description(desc: dict) -> SearchSpace:
    """Rebuild the search space of :func:`describe_model`'s output."""
    from transformers import AutoConfig

    cfg = dict(desc["hf_config"])
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise NaspruneError("the predictor's manifest has no model_type in its HF config; re-fit the predictor")
    config = AutoConfig.for_model(model_type, **cfg)
    return SearchSpace.from_config(
        config, SearchSpaceConfig.from_dict(desc.get("space_config")), desc.get("layer_ranking")
    )
