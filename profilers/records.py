"""Profile records: identity of what was measured (the key) and the documented record layout.

A record's ``key`` hashes the model weights, the sub-network, the workload and the
``fingerprint_id`` (device + engine + precision + threads + export recipe). It is computable
*before* measuring, which is what lets a rerun skip what is already in the store.
"""

from __future__ import annotations

import torch

from compressor.core.errors import NaspruneError
from compressor.core.hashing import sha256_json, sha256_parts
from compressor.core.workload import Workload
from compressor.elastic.modeldir import now, weights_hash
from compressor.elastic.search_space import SearchSpace, SubNetwork
from profilers.standalone import SCHEMA


def record_key(model_sha256: str, arch: dict, workload: str, fingerprint_id: str) -> str:
    ident = {"schema": SCHEMA, "model": model_sha256, "arch": arch, "workload": workload, "fingerprint": fingerprint_id}
    return sha256_json(ident, 24)


def model_identity(loaded) -> dict:
    """``{"source", "sha256"}``: the source named by provenance and a hash of the weights used."""
    source = loaded.meta.provenance.get("source") or str(loaded.source)
    if loaded.path is not None and any(loaded.path.glob("*.safetensors")):
        return {"source": source, "sha256": weights_hash(loaded.path)}
    h = sha256_parts(
        part
        for name, tensor in sorted(loaded.model.state_dict().items())
        for part in (name, tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    )
    return {"source": source, "sha256": h.hexdigest()}


def workload_dict(w: Workload) -> dict:
    return {"text": str(w), "kind": w.kind, "batch": w.batch, "seq": w.seq, "new_tokens": w.new_tokens}


def graph_bytes_for(graph_bytes: dict[str, int], w: Workload) -> int:
    """Bytes of the graphs a workload runs (prefill, decode or both); torch: the checkpoint."""
    if set(graph_bytes) <= {"prefill", "decode"}:
        used = {"prefill": ("prefill",), "decode": ("decode",), "generate": ("prefill", "decode")}[w.kind]
        return sum(graph_bytes[g] for g in used if g in graph_bytes)
    return sum(graph_bytes.values())


def costs(space: SearchSpace, sub: SubNetwork, workload: Workload, precision: str) -> dict:
    """Analytic facts about the measured pair, computed where the search space is known."""
    kv_precision = precision if precision in ("fp16", "bf16") else "fp32"
    return {
        "params": space.num_params(sub),
        "num_kv_heads": space.num_kv_heads(sub),
        "flops": space.flops(sub, workload),
        "kv_cache_bytes": space.kv_cache_bytes(sub, workload, kv_precision),
    }


def job_meta(
    model: dict, space: SearchSpace, sub: SubNetwork, workload: Workload, precision: str, graph_bytes: int, export: dict
) -> dict:
    """What a record needs besides the measurement; travels inside the job (to edge devices too)."""
    return {
        "model": model,
        "arch": sub.to_dict(),
        "costs": costs(space, sub, workload, precision),
        "graph_bytes": graph_bytes,
        "export": export,
    }


def build_record(job: dict, result: dict, protocol: dict, created_at: str | None = None) -> dict:
    """The documented record (``docs/profiling.md``) from a job and the worker's result for it."""
    meta, w = job["meta"], job["workload"]
    stats = result["stats_ms"]
    tokens_per_s = (
        w["batch"] * w["new_tokens"] / (stats["median"] / 1e3)
        if w["kind"] == "generate" and stats["median"] > 0
        else None
    )
    return {
        "schema": SCHEMA,
        "key": record_key(meta["model"]["sha256"], meta["arch"], w["text"], result["fingerprint_id"]),
        "model": meta["model"],
        "arch": meta["arch"],
        "num_kv_heads": meta["costs"]["num_kv_heads"],
        "params": meta["costs"]["params"],
        "flops": meta["costs"]["flops"],
        "workload": w["text"],
        "engine": job["engine"],
        "device": job["device"],
        "provider": job.get("provider"),
        "precision": job["precision"],
        "threads": job["threads"],
        "recipe_id": job["recipe_id"],
        "export_recipe": job["recipe"],
        "fingerprint_id": result["fingerprint_id"],
        "fingerprint": result["fingerprint"],
        "stats_ms": stats,
        "tokens_per_s": tokens_per_s,
        "peak_memory_bytes": result.get("peak_memory_bytes"),
        "graph_bytes": meta["graph_bytes"],
        "kv_cache_bytes": meta["costs"]["kv_cache_bytes"],
        "env": result["env"],
        "export": meta["export"],
        "protocol": protocol,
        "created_at": created_at or now(),
    }


# ---- the one profile-record schema and its validator (store, edge import and predictors use it) ----
REQUIRED = (
    "schema",
    "key",
    "model",
    "arch",
    "params",
    "workload",
    "engine",
    "device",
    "provider",
    "precision",
    "recipe_id",
    "export_recipe",
    "fingerprint_id",
    "fingerprint",
    "stats_ms",
    "tokens_per_s",
    "peak_memory_bytes",
    "graph_bytes",
    "kv_cache_bytes",
    "env",
    "created_at",
)
STATS = ("min", "median", "mean", "p90", "p99", "std", "cv", "count")


def validate_record(record: dict) -> None:
    """Raise a one-line NaspruneError unless ``record`` is a complete record of this nasprune's SCHEMA."""
    if not isinstance(record, dict):
        raise NaspruneError(f"a profile record must be a JSON object, not {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise NaspruneError(f"profile record lacks {', '.join(missing)}; it is not a {SCHEMA} record")
    if record["schema"] != SCHEMA:
        raise NaspruneError(f"profile record has schema {record['schema']!r}, this nasprune reads {SCHEMA!r}")
    if set(STATS) - set(record["stats_ms"]):
        raise NaspruneError(f"profile record {record['key']} has incomplete stats_ms (needs {', '.join(STATS)})")
