"""The measurement protocol and the edge runner; with ``standalone_ort.py`` (the ONNX Runtime
runner) two files that need only the Python standard library, numpy and onnxruntime.

Why self-contained: the same code must time graphs here (``python -m profilers.worker``) and on an
edge device that has no torch, transformers or nasprune. ``nasprune profile --export-only DIR``
copies this file as ``DIR/run_profile.py`` and ``standalone_ort.py`` next to it (run as a script,
this file imports its sibling from there); results come back with ``nasprune profile import``.
Keeping one copy of the protocol means a number measured on a phone and one measured here were
produced by the same loop.

The protocol (like trtexec / onnxruntime_perf_test): a static shape per measurement; warm-up
until both a count and a time are reached; then at least ``min_iters`` iterations *and* at least
``min_seconds``; min, median, mean, p90, p99, std, CV and count of the per-iteration times;
fixed intra-op threads and optional CPU pinning. Timing holds an exclusive machine-wide lock
(``flock``), so two nasprune profilers never time at once (on 2 cores a competing process made
torch 29x slower). Load average, a single-thread reference-kernel score and memory bandwidth
are recorded before and after; when they drift, or the iterations spread, the measurement is
repeated and the least-disturbed attempt kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# The reference kernel is single-threaded: set before numpy loads its BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

if __package__:  # imported as profilers.standalone
    from profilers.standalone_ort import ORT_PROVIDERS, OrtRunner, ort_version
else:  # run as DIR/run_profile.py: its sibling DIR/standalone_ort.py, exported with it
    from standalone_ort import ORT_PROVIDERS, OrtRunner, ort_version

SCHEMA = "nasprune-profile/1"


def default_lock_path() -> str:
    """The machine-wide lock file (``$NASPRUNE_PROFILE_LOCK`` overrides, read at each use)."""
    return os.environ.get("NASPRUNE_PROFILE_LOCK") or str(Path(tempfile.gettempdir()) / "nasprune-profile.lock")


# ---- protocol -------------------------------------------------------------------------------
@dataclass
class Protocol:
    """How long and how carefully to time one (graph, workload) pair."""

    warmup_iters: int = 3
    warmup_seconds: float = 0.5
    min_iters: int = 10
    min_seconds: float = 2.0
    max_iters: int = 10_000
    max_seconds: float = 120.0
    max_ref_drift: float = 0.10  # re-measure when the reference score moves more than this fraction
    max_load_rise: float = 1.0  # ... or the 1-minute load average rises more than this
    max_cv: float = 0.10  # ... or the iterations spread more than this (std / mean)
    max_remeasure: int = 2
    probe_seconds: float = 0.2  # length of each reference-kernel / bandwidth probe
    # The machine's undisturbed reference score (GFLOP/s), when the caller knows it: an attempt
    # whose reference runs more than max_ref_drift below it timed a machine in a slow phase.
    fast_ref_score: float | None = None
    retry_wait_seconds: float = 1.0  # pause before re-measuring, so a slow phase can pass
    lock_path: str | None = None  # None: default_lock_path() of the machine that times
    pin_cpus: list[int] | None = None

    @staticmethod
    def from_dict(d: dict | None) -> Protocol:
        """The protocol ``d`` describes; an unknown setting (a typo) is a ValueError, never ignored."""
        d = dict(d or {})
        unknown = sorted(set(d) - set(Protocol.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown protocol settings {unknown}; known: {sorted(Protocol.__dataclass_fields__)}")
        return Protocol(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples_ms: list[float]) -> dict:
    """The statistics every record carries (milliseconds; ``cv`` = std / mean)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {
        "min": float(a.min()),
        "median": float(np.median(a)),
        "mean": mean,
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "std": std,
        "cv": std / mean if mean > 0 else 0.0,
        "count": int(a.size),
    }


def measure(step: Callable[[], float], protocol: Protocol) -> list[float]:
    """Warm up, then time ``step`` (which returns its own duration in ms) by count and time."""
    start, i = time.perf_counter(), 0
    while i < protocol.warmup_iters or time.perf_counter() - start < protocol.warmup_seconds:
        step()
        i += 1
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        samples.append(step())
        elapsed = time.perf_counter() - start
        enough = len(samples) >= protocol.min_iters and elapsed >= protocol.min_seconds
        capped = len(samples) >= protocol.min_iters and (
            len(samples) >= protocol.max_iters or elapsed >= protocol.max_seconds
        )
        if enough or capped:
            return samples


def reference_score(seconds: float = 0.2) -> float:
    """Single-thread GFLOP/s of a 256x256 fp32 matmul: a fingerprint of core speed and contention."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256), dtype=np.float32), rng.standard_normal((256, 256), dtype=np.float32)
    flops, rates = 2 * 256**3 * 8, []
    with _single_thread_blas():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(rates) < 3:
            t = time.perf_counter()
            for _ in range(8):
                a @ b
            rates.append(flops / (time.perf_counter() - t) / 1e9)
    return float(np.median(rates))


def _single_thread_blas():
    """One BLAS thread even when numpy was loaded before the environment variables above were set
    (the in-process latency gate): a 2-thread reference would feel the *other* core's neighbours,
    which the 1-thread model never sees. threadpoolctl is optional (the edge runner lacks it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def reference_bandwidth(seconds: float = 0.2) -> float:
    """GB/s of summing a 64 MiB array. LLM inference is memory-bound: a neighbour streaming memory
    slows it while leaving the cache-resident matmul score untouched, so both are checked."""
    a = np.ones(16 << 20, dtype=np.float32)
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        t = time.perf_counter()
        a.sum()
        rates.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    return float(np.median(rates))


def load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):  # not on every platform
        return None


@contextlib.contextmanager
def machine_lock(path: str):
    """Exclusive lock shared by every nasprune profiler on this machine; yields seconds waited."""
    t = time.perf_counter()
    try:
        import fcntl
    except ImportError:  # Windows edge device: one runner at a time is the user's job there
        yield None
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield round(time.perf_counter() - t, 3)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pin_cpus(cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter (Linux ``clear_refs``) so each job reports its own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process since ``reset_peak_rss`` (VmHWM), else since start."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def slow_phase(ref_score: float, protocol: Protocol) -> bool:
    """True when the reference kernel ran clearly below the machine's known undisturbed speed."""
    return bool(protocol.fast_ref_score) and ref_score < (1 - protocol.max_ref_drift) * protocol.fast_ref_score


def timed(prepare: Callable[[], Callable[[], float]], protocol: Protocol) -> dict:
    """Prepare and time under the machine lock; re-measure while the machine looks disturbed.

    ``prepare`` builds the session/engine (inside the lock: building is heavy work that would
    disturb another profiler's timing) and returns the per-iteration step. An attempt counts as
    disturbed when the reference matmul score or memory bandwidth moved by more than
    ``max_ref_drift``, the load average rose by more than ``max_load_rise``, or the iterations
    themselves spread by more than ``max_cv``, or (given ``fast_ref_score``) the reference ran
    slower than the machine's undisturbed speed: a virtual machine's host can make everything
    ~1.4x slower for seconds at a time, steadily, which before/after drift does not see.
    Interference only ever adds time, so of all attempts the one with the lowest median is kept;
    every attempt's median is recorded.
    """
    pin_cpus(protocol.pin_cpus)
    reset_peak_rss()
    attempts = []
    probe = protocol.probe_seconds
    with machine_lock(protocol.lock_path or default_lock_path()) as waited:
        step = prepare()
        for attempt in range(protocol.max_remeasure + 1):
            if attempt:
                time.sleep(protocol.retry_wait_seconds)
            load_before, ref_before, bw_before = load_average(), reference_score(probe), reference_bandwidth(probe)
            samples = measure(step, protocol)
            load_after, ref_after, bw_after = load_average(), reference_score(probe), reference_bandwidth(probe)
            stats = summarize(samples)
            load_rise = (load_after - load_before) if load_before is not None and load_after is not None else 0.0
            drifted = (
                abs(ref_after / ref_before - 1.0) > protocol.max_ref_drift
                or abs(bw_after / bw_before - 1.0) > protocol.max_ref_drift
                or load_rise > protocol.max_load_rise
                or stats["cv"] > protocol.max_cv
                or slow_phase(min(ref_before, ref_after), protocol)
            )
            attempts.append(
                {
                    "samples_ms": samples,
                    "stats_ms": stats,
                    "env": {
                        "load_before": load_before,
                        "load_after": load_after,
                        "ref_score_before": ref_before,
                        "ref_score_after": ref_after,
                        "ref_bandwidth_before": bw_before,
                        "ref_bandwidth_after": bw_after,
                        "drifted": drifted,
                    },
                }
            )
            if not drifted:
                break
    best = min(attempts, key=lambda a: a["stats_ms"]["median"])
    best["env"].update(
        {
            "remeasured": len(attempts) - 1,
            "attempt_medians_ms": [a["stats_ms"]["median"] for a in attempts],
            "lock_wait_s": waited,
            "pinned_cpus": protocol.pin_cpus,
        }
    )
    return {**best, "peak_memory_bytes": peak_rss_bytes()}


# ---- device fingerprint ---------------------------------------------------------------------
def _cpuinfo() -> tuple[str, list[str], int | None]:
    model, flags, cores = platform.processor() or platform.machine(), [], set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags, None
    physical = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "Hardware") and value:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = sorted(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return model, flags, len(cores) or None


def _gpu() -> dict:
    """GPU name, driver and CUDA version from nvidia-smi (no Python GPU package needed)."""
    if not shutil.which("nvidia-smi"):
        return {"name": None, "driver": None, "cuda": None}
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()
        )
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return {"name": None, "driver": None, "cuda": None}
    name, _, driver = (out[0] if out else ",").partition(",")
    cuda = header.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in header else None
    return {"name": name.strip() or None, "driver": driver.strip() or None, "cuda": cuda, "count": len(out)}


def host_fingerprint(device: str) -> dict:
    model, flags, physical = _cpuinfo()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "machine": platform.machine(),
        "system": platform.system(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "gpu": _gpu() if device == "cuda" else {"name": None, "driver": None, "cuda": None},
    }


def make_fingerprint(
    host: dict,
    engine: str,
    engine_version: str,
    provider: str | None,
    device: str,
    precision: str,
    threads: int,
    recipe_id: str,
    ref_score: float | None,
) -> dict:
    return {
        "host": host,
        "engine": engine,
        "engine_version": engine_version,
        "provider": provider,
        "device": device,
        "precision": precision,
        "threads": threads,
        "recipe_id": recipe_id,
        "ref_score": ref_score,
    }


# Measured, not identity: re-runs on the same machine share an id whatever their score was.
NON_IDENTITY = ("ref_score",)


def fingerprint_id(fingerprint: dict) -> str:
    identity = {k: v for k, v in fingerprint.items() if k not in NON_IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# ---- ONNX Runtime jobs -----------------------------------------------------------------------
def run_ort_job(job: dict, protocol: Protocol, base: Path | None = None) -> dict:
    """Time one job (graphs + workload) on ONNX Runtime: the worker's and the edge runner's core."""
    base = Path(base or ".")
    w = job["workload"]
    graphs = {name: str(base / path) for name, path in job["files"].items() if name in ("prefill", "decode")}

    def prepare():
        runner = OrtRunner(graphs, job["provider"], job["precision"], job["threads"], job.get("device_id", 0))
        return runner.step_for(w["kind"], w["batch"], w["seq"], w.get("new_tokens", 0))

    result = timed(prepare, protocol)
    host = host_fingerprint(job["device"])
    result["fingerprint"] = make_fingerprint(
        host,
        "onnxruntime",
        ort_version(),
        job["provider"],
        job["device"],
        job["precision"],
        job["threads"],
        job["recipe_id"],
        result["env"]["ref_score_before"],
    )
    result["fingerprint_id"] = fingerprint_id(result["fingerprint"])
    return result


# ---- edge runner: python run_profile.py EXPORT_DIR ------------------------------------------
def _utc_now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def edge_main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Time nasprune-exported graphs with ONNX Runtime on this device.")
    ap.add_argument("export_dir", type=Path, help="the directory written by nasprune profile --export-only")
    ap.add_argument("--out", type=Path, help="results file (JSON lines; default EXPORT_DIR/results.jsonl)")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: as exported)")
    ap.add_argument("--provider", help="cpu, cuda, tensorrt or an ONNX Runtime provider name (default: CPU)")
    ap.add_argument("--pin", help="comma-separated CPU ids to pin to")
    args = ap.parse_args(argv)
    manifest = json.loads((args.export_dir / "jobs.json").read_text())
    out = args.out or args.export_dir / "results.jsonl"
    done = set()
    if out.exists():
        done = {json.loads(line)["job"]["id"] for line in out.read_text().splitlines() if line.strip()}
    protocol = Protocol.from_dict(manifest["protocol"])
    protocol.lock_path = None  # this device's own lock, not the exporting machine's path
    if args.pin:
        protocol.pin_cpus = [int(c) for c in args.pin.split(",")]
    jobs = [j for j in manifest["jobs"] if j["id"] not in done]
    print(f"{len(jobs)} to time, {len(done)} already in {out}", flush=True)
    for n, job in enumerate(jobs, 1):
        provider = ORT_PROVIDERS.get(args.provider, args.provider) if args.provider else job["provider"]
        job = {
            **job,
            "threads": args.threads or job["threads"],
            "provider": provider,
            "device": "cpu" if provider == ORT_PROVIDERS["cpu"] else "cuda",
        }
        result = run_ort_job(job, protocol, args.export_dir)
        result.pop("samples_ms")
        line = {
            "schema": SCHEMA,
            "job": job,
            "result": result,
            "protocol": protocol.to_dict(),
            "created_at": _utc_now(),
        }
        with open(out, "a") as f:  # one line per job, flushed: a killed run loses at most the job in flight
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        s = result["stats_ms"]
        print(
            f"[{n}/{len(jobs)}] {job['label']} {job['workload']['text']}: median {s['median']:.2f} ms "
            f"(cv {s['cv']:.1%}, n={s['count']})",
            flush=True,
        )
    print(f"results in {out}; bring them back with: nasprune profile import {out} --store PATH")
    return 0


if __name__ == "__main__":
    sys.exit(edge_main())
