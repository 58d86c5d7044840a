"""Measuring a bundle's engines here, with the profilers' protocol, lock and fingerprint."""

from __future__ import annotations

from pathlib import Path

from compressor.core.workload import Workload, WorkloadMix
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


# statistics for which the weighted sum over a mix's terms is meaningful: the mean is exactly the expected
# time of the mix; the median of a sum is not the sum of medians, but it is the figure every report compares
MIX_STATS = ("median", "mean")


def combine_mix(mix: WorkloadMix, results: dict[Workload, dict]) -> dict:
    """A mix's measurement from its terms' (``measure_bundle`` results, by workload): ``stats_ms`` holds the
    weighted sums of :data:`MIX_STATS`, ``terms`` each term's own measurement."""
    terms = [
        {
            "workload": str(m.workload),
            "weight": m.weight,
            "stats_ms": results[m.workload]["stats_ms"],
            "fingerprint_id": results[m.workload]["fingerprint_id"],
            "env": results[m.workload].get("env", {}),
        }
        for m in mix.members
    ]
    stats = {
        k: float(mix.expected(lambda w, k=k: float(results[w]["stats_ms"][k])))
        for k in MIX_STATS
        if all(k in results[w]["stats_ms"] for w in mix.workloads)
    }
    return {
        "stats_ms": stats,
        "terms": terms,
        "fingerprint_id": terms[0]["fingerprint_id"],
        "env": {"drifted": any(t["env"].get("drifted") for t in terms)},
        "note": "stats_ms: weighted sum of the terms' statistics (each term measured on its own)",
    }


def measure_mix(
    bundle: Path,
    mix: WorkloadMix,
    variant: str = "fp32",
    threads: int = 1,
    device: str = "cpu",
    protocol=None,
    measured: dict | None = None,
) -> dict:
    """:func:`measure_bundle` of a plain workload, or each term of a mix measured once and combined.

    ``measured``: workload -> result of earlier measurements of this bundle/variant, reused and
    extended (a workload shared by several mixes is measured once)."""
    measured = {} if measured is None else measured
    for w in mix.workloads:
        if w not in measured:
            measured[w] = measure_bundle(bundle, w, variant, threads, device, protocol)
    return measured[mix.single] if mix.single is not None else combine_mix(mix, measured)


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
