"""``profile``: real latency of sampled sub-networks of the trained super-network, at every profiled
precision, into the resumable profile store ``RUN/profiles.sqlite``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nasprune.stages.base import Stage


@dataclass
class ProfileConfig:
    """Each precision (``fp32``, or a quantization recipe of ``compressor.quant.quantize`` on onnxruntime cpu)
    is profiled on the same sub-networks and gets its own predictor; the search's precision gene
    chooses among them."""

    engine: str = "onnxruntime"
    device: str = "cpu"
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    workloads: list[str] = field(default_factory=lambda: ["prefill:1x128"])
    samples: int = 24
    # sub-networks profiled per quantization recipe (the first of the same list; quantizing a graph costs
    # ~20-40 s here, more than exporting and timing it); null: all ``samples``
    quantized_samples: int | None = None
    sampler: str = "grid-params"
    threads: int = 1
    protocol: dict = field(default_factory=dict)
    # wall-clock budget of the stage, shared by the precisions in proportion to their sub-networks: a
    # slow host profiles fewer of them (never fewer than the predictor's folds + 1) instead of overrunning
    minutes: float | None = None


def run(ctx) -> dict:
    from compressor.core.precisions import FLOAT_PRECISIONS
    from compressor.elastic.modeldir import load_model
    from profilers import profile_subnetworks
    from profilers.api import choose_subnetworks
    from profilers.standalone import Protocol

    c = ctx.cfg.profile
    loaded = load_model(str(ctx.supernet_dir))
    subs = choose_subnetworks(loaded.supernet().space, sampler=c.sampler, samples=c.samples)
    plan = {  # same sub-networks at every precision (the store resumes per group)
        p: subs if p in FLOAT_PRECISIONS or not c.quantized_samples else subs[: c.quantized_samples]
        for p in c.precisions
    }
    start, counts = time.perf_counter(), {}
    for i, (precision, chosen) in enumerate(plan.items()):
        share = None
        if c.minutes is not None:  # what is left, split by the sub-networks still to do
            left = c.minutes * 60 - (time.perf_counter() - start)
            share = left * len(chosen) / sum(len(v) for v in list(plan.values())[i:])
        ctx.log(f"  profiling {len(chosen)} sub-networks at {precision}")
        records = profile_subnetworks(
            loaded,
            chosen,
            c.workloads,
            engine=c.engine,
            device=c.device,
            precision=precision,
            store=ctx.store,
            threads=c.threads,
            protocol=Protocol.from_dict(c.protocol),
            workdir=ctx.run / "profile_work",
            max_seconds=share,
            min_subnetworks=ctx.cfg.predictor.folds + 1,
        )
        counts[precision] = len(records) // len(c.workloads)
        if counts[precision] < len(chosen):
            ctx.log(f"  {precision}: {counts[precision]} of {len(chosen)} within its {share:.0f}s of profile.minutes")
    return {"records": counts}


STAGE = Stage(
    name="profile",
    run=run,
    reads=("supernet/",),
    writes=("profiles.sqlite", "profile_work/"),
    resumes="skips the (sub-network, workload, precision) records already in profiles.sqlite",
)
