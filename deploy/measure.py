"""Measuring a bundle's engines here, with the profilers' protocol, lock and fingerprint."""

from __future__ import annotations

from pathlib import Path

from compressor.workload import Workload
from deploy.bundle import engine_manifest, graph_paths
from deploy.regression import Measurement


def _job(bundle: Path, workload: Workload, variant: str, threads: int, device: str) -> dict:
    from profilers.standalone import ORT_PROVIDERS

    manifest = engine_manifest(bundle, variant)
    paths = graph_paths(bundle, variant)
    return {
        "files": {k: str(v) for k, v in paths.items()},
        "workload": {
            "kind": workload.kind,
            "batch": workload.batch,
            "seq": workload.seq,
            "new_tokens": workload.new_tokens,
        },
        "provider": ORT_PROVIDERS[device],
        "precision": variant,
        "threads": threads,
        "device": device,
        "recipe_id": manifest["engines"][variant]["recipe_id"],
    }


def measure_bundle(
    bundle: Path, workload: Workload, variant: str = "fp32", threads: int = 1, device: str = "cpu", protocol=None
) -> dict:
    """One protocol measurement (stats_ms, env, fingerprint, fingerprint_id) of the bundle's graphs."""
    from profilers.standalone import Protocol, run_ort_job

    return run_ort_job(_job(Path(bundle), workload, variant, threads, device), protocol or Protocol())


def _gate_protocol(iters_per_block: int):
    from profilers.standalone import Protocol

    # A short warm-up per block (the session stays warm between blocks; this only re-primes caches).
    return Protocol(
        warmup_iters=2, warmup_seconds=0.05, min_iters=iters_per_block, min_seconds=0.0, max_iters=iters_per_block
    )


def _identity(job: dict, workload: Workload, device: str, threads: int) -> dict:
    from profilers.standalone import fingerprint_id, host_fingerprint, make_fingerprint, ort_version

    fp = make_fingerprint(
        host_fingerprint(device),
        "onnxruntime",
        ort_version(),
        job["provider"],
        device,
        job["precision"],
        threads,
        job["recipe_id"],
        None,
    )
    return {
        "fingerprint_id": fingerprint_id(fp),
        "engine": "onnxruntime",
        "provider": job["provider"],
        "precision": job["precision"],
        "recipe_id": job["recipe_id"],
        "workload": str(workload),
    }


def _step(job: dict, workload: Workload):
    from profilers.standalone import OrtRunner

    runner = OrtRunner(job["files"], job["provider"], job["precision"], job["threads"])
    return runner.step_for(workload.kind, workload.batch, workload.seq, workload.new_tokens)


def _reference_ms() -> float:
    from profilers.standalone import reference_score

    return 1000.0 / reference_score(0.1)  # ms per GFLOP of the single-thread reference matmul


def measure_blocks(
    bundle: Path,
    workload: Workload,
    variant: str = "fp32",
    threads: int = 1,
    device: str = "cpu",
    blocks: int = 10,
    iters_per_block: int = 20,
) -> Measurement:
    """Interleaved blocks: the bundle's workload, then a reference kernel, ``blocks`` times, under the lock.

    Each block yields ``iters_per_block`` latency samples plus the reference kernel's time, so a
    comparison with a *stored* baseline can normalize away machine-wide speed changes.
    """
    from profilers.standalone import default_lock_path, machine_lock, measure

    job = _job(Path(bundle), workload, variant, threads, device)
    protocol = _gate_protocol(iters_per_block)
    samples, refs = [], []
    with machine_lock(protocol.lock_path or default_lock_path()):
        step = _step(job, workload)
        for _ in range(blocks):
            samples.append(measure(step, protocol))
            refs.append(_reference_ms())
    return Measurement(samples, refs, _identity(job, workload, device, threads))


def measure_paired(
    current: Path,
    baseline: Path,
    workload: Workload,
    variant: str = "fp32",
    threads: int = 1,
    device: str = "cpu",
    blocks: int = 10,
    iters_per_block: int = 20,
) -> tuple[Measurement, Measurement]:
    """Both bundles in one process, alternating iteration by iteration, under the lock.

    Why: on a shared or virtualized machine the speed of the whole box shifts by 20-60% for
    fractions of a second to seconds at a time (measured here: see benchmarks/gate_reliability.py).
    A baseline measured at another time carries such a shift into the ratio, and so did blocks
    of 20 iterations per side: the phases are about as long as a block. Iterations run back to
    back (~the model's latency apart) see the same machine, so sample j of block i on both sides
    forms a pair; the order inside a pair alternates so neither side always follows the other's
    cache footprint. Blocks only group pairs for the bootstrap and the reference kernel.
    """
    from profilers.standalone import default_lock_path, machine_lock

    jobs = [_job(Path(b), workload, variant, threads, device) for b in (current, baseline)]
    protocol = _gate_protocol(iters_per_block)
    samples: list[list[list[float]]] = [[], []]
    refs = []
    with machine_lock(protocol.lock_path or default_lock_path()):
        steps = [_step(job, workload) for job in jobs]
        for i in range(blocks):
            for _ in range(protocol.warmup_iters):
                steps[0](), steps[1]()
            block: list[list[float]] = [[], []]
            for j in range(iters_per_block):
                for side in (0, 1) if (i + j) % 2 == 0 else (1, 0):
                    block[side].append(steps[side]())
            samples[0].append(block[0])
            samples[1].append(block[1])
            refs.append(_reference_ms())
    cur, base = (
        Measurement(samples[k], list(refs), {**_identity(jobs[k], workload, device, threads), "paired": True})
        for k in (0, 1)
    )
    return cur, base
