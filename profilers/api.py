"""Profile sub-networks of a loaded model into a store: the Python entry point the CLI, the
pipeline and adaptive predictor fitting share.

Per sub-network: skip the workloads whose key is already stored, extract the sub-network,
prepare the engine's artifacts once (ONNX graphs with parity check, or a checkpoint), time every
remaining workload in one worker process (``profilers.worker``, machine-wide lock per job), add
each record the moment its line arrives, then delete the artifacts (graphs are ~0.6 GB each
for SmolLM2 in fp32).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from compressor.core.errors import NaspruneError
from compressor.core.workload import Workload
from compressor.elastic.search_space import SearchSpace, SubNetwork
from profilers.base import Engine, get_engine, graphs_for
from profilers.records import build_record, graph_bytes_for, job_meta, model_identity, record_key, workload_dict
from profilers.standalone import Protocol, fingerprint_id, host_fingerprint, make_fingerprint
from profilers.store import ProfileStore


@dataclass
class Plan:
    """Everything about a profiling run that is fixed before the first measurement."""

    engine: Engine
    device: str
    provider: str | None
    precision: str
    threads: int
    recipe: dict
    recipe_id: str
    fingerprint_id: str
    model: dict
    workloads: list[Workload]

    def key(self, sub: SubNetwork, w: Workload) -> str:
        return record_key(self.model["sha256"], sub.to_dict(), str(w), self.fingerprint_id)

    def job(
        self, space: SearchSpace, sub: SubNetwork, w: Workload, files: dict, graph_bytes: int, export: dict
    ) -> dict:
        return {
            "id": self.key(sub, w),
            "label": str(sub),
            "engine": self.engine.name,
            "device": self.device,
            "provider": self.provider,
            "precision": self.precision,
            "threads": self.threads,
            "recipe_id": self.recipe_id,
            "recipe": self.recipe,
            "workload": workload_dict(w),
            "files": files,
            "meta": job_meta(self.model, space, sub, w, self.precision, graph_bytes, export),
        }


def parse_workloads(workloads) -> list[Workload]:
    out = [w if isinstance(w, Workload) else Workload.parse(str(w)) for w in workloads]
    if not out:
        raise NaspruneError("no workload given; pass --workload prefill:1x128 (or decode:BxC, generate:BxP+N)")
    return list(dict.fromkeys(out))


def make_plan(
    loaded,
    workloads,
    engine: str = "onnxruntime",
    device: str = "cpu",
    precision: str = "fp32",
    threads: int = 1,
    exporter: str = "torchscript",
    provider: str | None = None,
) -> Plan:
    from compressor.quant.onnx_export import recipe_id

    eng = get_engine(engine)
    eng.check(device, precision)
    if threads < 1:
        raise NaspruneError(f"--threads must be >= 1, not {threads}")
    prov = eng.provider(device, provider)
    recipe = eng.recipe(precision, exporter)
    rid = recipe_id(recipe)
    fp = make_fingerprint(
        host_fingerprint(device), eng.name, eng.version(device), prov, device, precision, threads, rid, None
    )
    return Plan(
        eng,
        device,
        prov,
        precision,
        threads,
        recipe,
        rid,
        fingerprint_id(fp),
        model_identity(loaded),
        parse_workloads(workloads),
    )


def choose_subnetworks(
    space: SearchSpace, archs=(), sampler: str = "grid-params", samples: int = 10, seed: int = 0
) -> list[SubNetwork]:
    """``archs`` if given; else the largest sub-network plus ``samples - 1`` from the sampler (distinct)."""
    from compressor.recovery.sampling import make_sampler

    if archs:
        subs = [a if isinstance(a, SubNetwork) else SubNetwork.parse(a) for a in archs]
        return list(dict.fromkeys(space.validate(s) for s in subs))
    if samples < 1:
        raise NaspruneError(f"--samples must be >= 1, not {samples}")
    chosen = [space.largest()]
    draw = make_sampler(sampler, space, seed=seed)
    for _ in range(samples * 50):
        if len(chosen) >= min(samples, space.size):
            break
        s = draw.sample()
        if s not in chosen:
            chosen.append(s)
    return chosen


def _progress(enabled: bool, total: int):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def run_worker(jobs: list[dict], protocol: Protocol, workdir: Path, on_line) -> None:
    """Run the jobs in one worker process; ``on_line(line)`` for every job as it finishes."""
    spec = workdir / "jobs.json"
    spec.write_text(json.dumps({"protocol": protocol.to_dict(), "jobs": jobs}))
    log = workdir / "worker.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(jobs[0]["threads"]),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "profilers.worker", str(spec)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        seen = 0
        try:
            for line in proc.stdout:
                if line.strip():
                    on_line(json.loads(line))
                    seen += 1
        except BaseException:
            proc.kill()  # the caller is giving up (error, Ctrl-C): do not leave a timer running
            raise
        finally:
            proc.wait()
    if proc.returncode != 0 or seen != len(jobs):
        tail = [x for x in log.read_text().splitlines() if x.strip()][-1:] or ["no output"]
        raise RuntimeError(f"profiling worker exited with {proc.returncode} after {seen}/{len(jobs)} jobs: {tail[0]}")


def with_fast_ref_score(protocol: Protocol, records) -> Protocol:
    """``protocol`` with the best reference score (GFLOP/s) in ``records`` as the machine's
    undisturbed speed, so later attempts timed in a slow phase are re-measured."""
    scores = [v for r in records for k, v in r["env"].items() if k.startswith("ref_score_") and v]
    if not scores or not protocol.max_remeasure:
        return protocol
    return replace(protocol, fast_ref_score=max(scores + [protocol.fast_ref_score or 0.0]))


def profile_subnetworks(
    loaded,
    subs,
    workloads,
    engine: str = "onnxruntime",
    device: str = "cpu",
    precision: str = "fp32",
    store: ProfileStore | str | Path | None = None,
    threads: int = 1,
    progress: bool = True,
    protocol: Protocol | None = None,
    exporter: str = "torchscript",
    provider: str | None = None,
    workdir: str | Path | None = None,
    max_seconds: float | None = None,
    min_subnetworks: int = 1,
) -> list[dict]:
    """Measure every (sub-network, workload) pair; returns their records (stored ones included).

    With a ``store`` a rerun skips the pairs already measured; without one nothing persists.
    With ``max_seconds`` no sub-network is started that would likely end after it (the slowest one so
    far is the estimate) once ``min_subnetworks`` have records: the list's prefix is profiled, so
    give it in the order that should survive a short budget (the samplers draw at random).
    The best reference-kernel score seen so far is handed to later workers as the machine's
    undisturbed speed (``Protocol.fast_ref_score``), so timings taken in a slow phase of the
    machine are re-measured.
    """
    plan = make_plan(loaded, workloads, engine, device, precision, threads, exporter, provider)
    protocol = protocol or Protocol()
    if isinstance(store, (str, Path)):
        store = ProfileStore(store)
    supernet = loaded.supernet()
    subs = [supernet.space.validate(s) for s in subs]
    base = Path(workdir) if workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}
    total = len(subs) * len(plan.workloads)
    start, slowest, have = time.perf_counter(), 0.0, 0
    with _progress(progress, total) as bar:
        task = bar.add_task("profiling", total=total) if bar else None

        def advance(text: str, n: int = 0):
            if bar:
                bar.update(task, description=text, advance=n)

        for sub in subs:
            todo = _not_stored(plan, store, sub, out)
            advance(f"{sub} (stored)", len(plan.workloads) - len(todo))
            if not todo:
                have += 1
                continue
            began = time.perf_counter()
            if max_seconds is not None and have >= min_subnetworks and began - start + slowest > max_seconds:
                break
            protocol = _profile_one(plan, supernet, sub, todo, protocol, store, out, base, advance)
            have, slowest = have + 1, max(slowest, time.perf_counter() - began)
    return [out[plan.key(s, w)] for s in subs for w in plan.workloads if plan.key(s, w) in out]


def _not_stored(plan: Plan, store: ProfileStore | None, sub, out: dict[str, dict]) -> list:
    """The workloads of ``sub`` still to measure; the stored records of the others go into ``out``."""
    todo = []
    for w in plan.workloads:
        key = plan.key(sub, w)
        stored = store.records(key=key) if store is not None else []
        if stored:
            out[key] = stored[0]
        else:
            todo.append(w)
    return todo


def _profile_one(plan: Plan, supernet, sub, todo, protocol: Protocol, store, out: dict[str, dict], base: Path, advance):
    """Export ``sub`` and time it on the ``todo`` workloads in one worker; every record goes into
    ``out`` (and ``store``) as it arrives. Returns the protocol for the next sub-network (with the best
    reference score seen so far)."""
    from compressor.elastic.extract import extract

    space = supernet.space
    work = Path(tempfile.mkdtemp(prefix=f"nasprune-{sub}-", dir=base))
    try:
        advance(f"{sub} export")
        artifacts = plan.engine.prepare(
            extract(supernet, sub), work / "artifacts", plan.recipe, graphs_for(todo), plan.provider
        )
        jobs = {
            plan.key(sub, w): (
                w,
                plan.job(space, sub, w, artifacts.files, graph_bytes_for(artifacts.graph_bytes, w), artifacts.export),
            )
            for w in todo
        }
        advance(f"{sub} timing")

        def on_line(line, protocol=protocol):  # records carry the protocol before this sub-network's update
            w, job = jobs[line["id"]]
            if "error" in line:
                raise NaspruneError(f"{plan.engine.name} failed on {sub} {w}: {line['error']}")
            record = build_record(job, line["result"], protocol.to_dict())
            if record["key"] != line["id"]:  # same machine, same code: only a bug gets here
                raise RuntimeError(
                    f"worker fingerprint {line['result']['fingerprint_id']} != planned {plan.fingerprint_id}"
                )
            if store is not None:
                store.add(record)
            out[record["key"]] = record
            advance(f"{sub} {w}", 1)

        protocol = with_fast_ref_score(protocol, out.values())
        run_worker([job for _, job in jobs.values()], protocol, work, on_line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return protocol
