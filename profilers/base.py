"""The one small interface every engine implements, and the registry of engines.

An engine has two halves that run in different processes:

* parent side (``prepare``): turn an extracted model into the artifacts the engine times (ONNX
  graphs, a saved checkpoint) and describe the recipe that produced them;
* worker side (``run_job``, in ``python -m profilers.worker``): load the artifacts, time one
  workload under the measurement protocol and return stats plus the device fingerprint.

``availability`` never raises: an engine that is not installed (or has no device) says why, and
callers skip it or print the reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from compressor.core.errors import NaspruneError

DEVICES = ("cpu", "cuda")
ENGINE_MODULES = {
    "torch": "profilers.engine_torch",
    "onnxruntime": "profilers.engine_onnxruntime",
    "tensorrt": "profilers.engine_tensorrt",
}


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str
    version: str | None = None


@dataclass
class Artifacts:
    """What the worker times: files, the recipe that made them and what making them cost."""

    directory: Path
    files: dict[str, str]
    graph_bytes: dict[str, int]  # per file key; a workload's graph size sums the graphs it runs
    export: dict = field(default_factory=dict)  # seconds and parity diffs, recorded with each measurement


class Engine:
    """Base class; subclasses set the class attributes and implement the four methods."""

    name = ""
    precisions: dict[str, tuple[str, ...]] = {}  # device -> precisions the engine can time there

    def availability(self, device: str) -> Availability:
        raise NotImplementedError

    def provider(self, device: str, requested: str | None = None) -> str | None:
        """The execution provider (ONNX Runtime) or None for engines without that notion."""
        if requested:
            raise NaspruneError(f"--provider applies to --engine onnxruntime only, not {self.name}")
        return None

    def recipe(self, precision: str, exporter: str) -> dict:
        raise NotImplementedError

    def prepare(
        self, model, directory: Path, recipe: dict, graphs: tuple[str, ...], provider: str | None = None
    ) -> Artifacts:
        raise NotImplementedError

    def run_job(self, job: dict, protocol) -> dict:
        raise NotImplementedError

    def version(self, device: str) -> str:
        info = self.availability(device)
        return info.version or "unknown"

    def check(self, device: str, precision: str) -> None:
        """Raise a one-line error when this engine cannot time (device, precision) here."""
        if device not in DEVICES:
            raise NaspruneError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
        info = self.availability(device)
        if not info.available:
            raise NaspruneError(f"engine {self.name} is unavailable on {device}: {info.reason}")
        allowed = self.precisions.get(device, ())
        if precision not in allowed:
            raise NaspruneError(
                f"engine {self.name} on {device} times precision {', '.join(allowed)}, not '{precision}'"
            )


def get_engine(name: str) -> Engine:
    if name not in ENGINE_MODULES:
        raise NaspruneError(f"unknown engine '{name}'; choose one of {', '.join(ENGINE_MODULES)}")
    return importlib.import_module(ENGINE_MODULES[name]).ENGINE


def list_engines() -> list[tuple[str, str, Availability]]:
    """(engine, device, availability) for every pair, for ``nasprune profile --list-engines``."""
    return [(name, device, get_engine(name).availability(device)) for name in ENGINE_MODULES for device in DEVICES]


def graphs_for(workloads) -> tuple[str, ...]:
    """Which graphs the workloads need: prefill for prefill/generate, decode for decode/generate."""
    kinds = {w.kind for w in workloads}
    return tuple(
        g for g, need in (("prefill", {"prefill", "generate"}), ("decode", {"decode", "generate"})) if kinds & need
    )
