"""``nasprune profile``: measure sub-networks into a store, list engines, export for edge devices,
import edge results. ``register(app)`` adds the command to the nasprune Typer app.

``profile import RESULTS --store PATH`` is spelled as the first positional argument being
``import`` (Typer cannot have a command that takes MODEL and also has sub-commands); a model dir
literally named ``import`` is passed as ``./import``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from compressor.core.errors import NaspruneError


def register(app: typer.Typer) -> None:
    from compressor.core.console import handles_errors

    @app.command("profile")
    @handles_errors
    def profile(
        model: Optional[str] = typer.Argument(
            None, help="MODEL (dir, .gguf, 'default'), or 'import' to import edge results"
        ),
        results: Optional[Path] = typer.Argument(None, help="with 'import': the results.jsonl from run_profile.py"),
        engine: str = typer.Option("onnxruntime", "--engine", help="torch | onnxruntime | tensorrt"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
        workload: List[str] = typer.Option(
            ["prefill:1x128"], "--workload", help="prefill:BxS, decode:BxC, generate:BxP+N (repeatable)"
        ),
        arch: List[str] = typer.Option([], "--arch", help="sub-network JSON or file (repeatable); default: sampled"),
        sampler: str = typer.Option("grid-params", "--sampler", help="grid-params | random (largest always included)"),
        samples: int = typer.Option(10, "--samples", help="number of sub-networks to sample"),
        seed: int = typer.Option(0, "--seed"),
        store: Optional[Path] = typer.Option(None, "--store", help="profile store file (SQLite), created if missing"),
        precision: str = typer.Option(
            "fp32",
            "--precision",
            help="fp32 | fp16 | bf16; onnxruntime cpu also int8 | int8-pc | int8-mixed | w8 | w4",
        ),
        threads: int = typer.Option(1, "--threads", help="intra-op threads (fixed for every measurement)"),
        provider: Optional[str] = typer.Option(None, "--provider", help="onnxruntime on cuda: cuda | tensorrt"),
        exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (fast) | dynamo"),
        pin: Optional[str] = typer.Option(None, "--pin", help="comma-separated CPU ids to pin the timing process to"),
        warmup_iters: int = typer.Option(3, "--warmup-iters"),
        warmup_seconds: float = typer.Option(0.5, "--warmup-seconds"),
        min_iters: int = typer.Option(10, "--min-iters"),
        min_seconds: float = typer.Option(2.0, "--min-seconds"),
        max_remeasure: int = typer.Option(
            2, "--max-remeasure", help="re-measurements when the machine looks disturbed"
        ),
        workdir: Optional[Path] = typer.Option(
            None, "--workdir", help="where graphs are written while timed (default: temp dir)"
        ),
        export_only: Optional[Path] = typer.Option(
            None, "--export-only", help="write graphs + run_profile.py for an edge device"
        ),
        list_engines: bool = typer.Option(
            False, "--list-engines", help="show which engines are available here and why not"
        ),
    ):
        """Real latency of sub-networks on torch / ONNX Runtime / TensorRT into a resumable profile store.

        Example: nasprune profile default --workload prefill:1x128 --samples 3 --store runs/profiles.sqlite
        """
        _profile(ProfileArgs(**locals()))  # locals() here: exactly the command's parameters


@dataclass
class ProfileArgs:
    """The ``nasprune profile`` command line, as parsed by Typer."""

    model: Optional[str]
    results: Optional[Path]
    engine: str
    device: str
    workload: List[str]
    arch: List[str]
    sampler: str
    samples: int
    seed: int
    store: Optional[Path]
    precision: str
    threads: int
    provider: Optional[str]
    exporter: str
    pin: Optional[str]
    warmup_iters: int
    warmup_seconds: float
    min_iters: int
    min_seconds: float
    max_remeasure: int
    workdir: Optional[Path]
    export_only: Optional[Path]
    list_engines: bool


def _profile(a: ProfileArgs) -> None:
    """``nasprune profile``: list the engines, import edge results, or profile MODEL."""
    from compressor.core.console import console

    if a.list_engines:
        return _list_engines(console)
    if a.model is None:
        raise NaspruneError(
            "missing MODEL; e.g. nasprune profile default --workload prefill:1x128 --store profiles.sqlite"
        )
    if a.model == "import":
        return _import(console, a.results, a.store)
    if a.results is not None:
        raise NaspruneError(f"unexpected extra argument '{a.results}'; only 'profile import RESULTS' takes two")
    _profile_model(console, a)


def _profile_model(console, a: ProfileArgs) -> None:
    """Measure sub-networks of ``a.model`` into ``a.store``, or export them for a device (``--export-only``)."""
    from compressor.elastic.modeldir import load_for_cli as _load
    from profilers.api import choose_subnetworks, parse_workloads
    from profilers.standalone import Protocol

    workloads = parse_workloads(a.workload)  # bad strings fail before the model loads
    if a.threads < 1:
        raise NaspruneError(f"--threads must be >= 1, not {a.threads}")
    protocol = Protocol(
        warmup_iters=a.warmup_iters,
        warmup_seconds=a.warmup_seconds,
        min_iters=a.min_iters,
        min_seconds=a.min_seconds,
        max_remeasure=a.max_remeasure,
        pin_cpus=[int(c) for c in a.pin.split(",")] if a.pin else None,
    )
    if a.export_only is not None and (a.engine, a.device) != ("onnxruntime", "cpu"):
        raise NaspruneError(
            "--export-only writes ONNX graphs for run_profile.py (ONNX Runtime; choose its provider "
            "there with --provider); drop --engine/--device"
        )
    if a.export_only is None:
        _check_engine(console, a)
    loaded = _load(a.model)
    subs = choose_subnetworks(loaded.supernet().space, a.arch, a.sampler, a.samples, a.seed)
    if a.export_only is not None:
        return _export_only(
            console, loaded, subs, workloads, a.export_only, a.precision, a.threads, a.exporter, protocol
        )
    _measure(console, a, loaded, subs, workloads, protocol)


def _check_engine(console, a: ProfileArgs) -> None:
    """Missing engines and a missing --store fail before the model loads."""
    from profilers.base import get_engine

    get_engine(a.engine).check(a.device, a.precision)
    if a.device == "cpu" and a.engine == "onnxruntime":
        from compressor.quant.quantize import saturation_risk

        risk = saturation_risk(a.precision)  # latency is still right; quality through it is not
        if risk:
            console.print(f"[yellow]warning:[/] {risk}")
    if a.store is None:
        raise NaspruneError("pass --store PATH (a SQLite file; reruns resume from it)")


def _measure(console, a: ProfileArgs, loaded, subs, workloads, protocol) -> None:
    from profilers.api import profile_subnetworks
    from profilers.store import ProfileStore

    before = len(ProfileStore(a.store))
    records = profile_subnetworks(
        loaded,
        subs,
        workloads,
        engine=a.engine,
        device=a.device,
        precision=a.precision,
        store=a.store,
        threads=a.threads,
        protocol=protocol,
        exporter=a.exporter,
        provider=a.provider,
        workdir=a.workdir,
    )
    _table(console, records)
    after = len(ProfileStore(a.store))
    console.print(
        f"{after - before} new record(s), {len(records) - (after - before)} already stored; {after} in {a.store}"
    )


def _list_engines(console) -> None:
    from rich.table import Table

    from profilers.base import list_engines

    table = Table(title="profiling engines")
    for col in ("engine", "device", "available", "version", "details / why not"):
        table.add_column(col)
    for name, device, info in list_engines():
        table.add_row(name, device, "yes" if info.available else "no", info.version or "-", info.reason)
    console.print(table)


def _table(console, records: list[dict]) -> None:
    from rich.table import Table

    table = Table(
        title=f"{records[0]['engine']} {records[0]['device']} {records[0]['precision']}, "
        f"{records[0]['threads']} thread(s)"
        if records
        else "no records"
    )
    for col in ("sub-network", "params", "workload", "median ms", "p90 ms", "cv", "n", "tokens/s"):
        table.add_column(col, justify="right")
    for r in records:
        a, s = r["arch"], r["stats_ms"]
        table.add_row(
            f"e{a['embed_dim']}-h{a['num_heads']}-f{a['ffn_dim']}-l{a['num_layers']}",
            f"{r['params']:,}",
            r["workload"],
            f"{s['median']:.2f}",
            f"{s['p90']:.2f}",
            f"{s['cv']:.1%}",
            str(s["count"]),
            f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-",
        )
    console.print(table)


def _import(console, results: Path | None, store: Path | None) -> None:
    from profilers.edge import import_results

    if results is None or store is None:
        raise NaspruneError("usage: nasprune profile import RESULTS --store PATH")
    added, lines = import_results(results, store)
    console.print(f"imported {added} new record(s) from {lines} result line(s) into {store}")


def _export_only(console, loaded, subs, workloads, out: Path, precision, threads, exporter, protocol) -> None:
    from profilers.edge import RUNNER, export_for_device

    with console.status("exporting graphs ...") as status:
        manifest = export_for_device(
            loaded,
            subs,
            workloads,
            out,
            precision,
            threads,
            exporter,
            protocol,
            progress=lambda sub: status.update(f"exported {sub}"),
        )
    console.print(f"wrote {len(subs)} sub-network(s), {len(manifest['jobs'])} job(s) to {out}")
    console.print(f"on the device: python {out.name}/{RUNNER} {out.name}   (needs numpy + onnxruntime)")
    console.print(f"then here:     nasprune profile import {out.name}/results.jsonl --store PATH")
