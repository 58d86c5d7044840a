"""Measuring a bundle's engines here, with the profilers' protocol, lock and fingerprint."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import NaspruneError
from compressor.workload import Workload
from deploy.bundle import graph_paths, read_manifest
from deploy.regression import Measurement

def _job(bundle: Path, workload: Workload, variant: str, threads: int, device: str) -> dict:
    from profilers.standalone import ORT_PROVIDERS

    manifest = read_manifest(bundle)
    if variant not in manifest["engines"]:
        raise NaspruneError(f"bundle has no {variant} engine (has {', '.join(manifest['engines'])}); "
                            f"re-export with --precision {variant}")
    paths = graph_paths(bundle, variant)
    return {"files": {k: str(v) for k, v in paths.items()}, "workload": {"kind": workload.kind, "batch": workload.batch,
            "seq": workload.seq, "new_tokens": workload.new_tokens}, "provider": ORT_PROVIDERS[device], "precision": variant,
            "threads": threads, "device": device, "recipe_id": manifest["engines"][variant]["recipe_id"]}


def measure_bundle(bundle: Path, workload: Workload, variant: str = "fp32", threads: int = 1, device: str = "cpu",
                   protocol=None) -> dict:
    """One protocol measurement (stats_ms, env, fingerprint, fingerprint_id) of the bundle's graphs."""
    from profilers.standalone import Protocol, run_ort_job

    return run_ort_job(_job(Path(bundle), workload, variant, threads, device), protocol or Protocol())


def measure_blocks(bundle: Path, workload: Workload, variant: str = "fp32", threads: int = 1, device: str = "cpu",
                   blocks: int = 5, iters_per_block: int = 20) -> Measurement:
    """Interleaved blocks: the bundle's workload, then a reference kernel, ``blocks`` times, under the lock.

    Each block yields ``iters_per_block`` latency samples plus the reference kernel's time, so the
    comparison can normalize away machine-wide speed changes.
    """
    from profilers.standalone import (OrtRunner, Protocol, default_lock_path, fingerprint_id, host_fingerprint, machine_lock,
                                      make_fingerprint, measure, ort_version, reference_score)

    job = _job(Path(bundle), workload, variant, threads, device)
    protocol = Protocol(warmup_iters=3, warmup_seconds=0.3, min_iters=iters_per_block, min_seconds=0.0,
                        max_iters=iters_per_block)
    samples, refs = [], []
    with machine_lock(protocol.lock_path or default_lock_path()):
        runner = OrtRunner(job["files"], job["provider"], variant, threads)
        step = runner.step_for(workload.kind, workload.batch, workload.seq, workload.new_tokens)
        for _ in range(blocks):
            samples.append(measure(step, protocol))
            refs.append(1000.0 / reference_score(0.1))  # ms per GFLOP of the reference kernel
    fp = make_fingerprint(host_fingerprint(device), "onnxruntime", ort_version(), job["provider"], device, variant,
                          threads, job["recipe_id"], None)
    identity = {"fingerprint_id": fingerprint_id(fp), "engine": "onnxruntime", "provider": job["provider"],
                "precision": variant, "recipe_id": job["recipe_id"], "workload": str(workload)}
    return Measurement(samples, refs, identity)
