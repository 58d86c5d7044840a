"""ONNX Runtime: CPUExecutionProvider here; CUDA and TensorRT execution providers where
onnxruntime-gpu is installed. Graphs come from ``compressor.quant.onnx_export`` (the deploy recipe), the
timing loop and IO binding from ``profilers.standalone`` (the same file edge devices run).

On CPU every quantization recipe of ``compressor.quant.quantize`` is a precision: the fp32 graphs are
exported (and checked for parity) as usual, then quantized by exactly the function bundles use,
and the recipe's dict becomes part of the export recipe (so of the ``recipe_id`` that keys
profiles and predictors). On CUDA the quantizers' integer kernels are CPU kernels, so only the
float precisions are offered there.
"""

from __future__ import annotations

import time
from pathlib import Path

from compressor.core.errors import NaspruneError
from compressor.core.precisions import RECIPES, export_dtype, recipe_for
from profilers.base import Artifacts, Availability, Engine
from profilers.standalone import Protocol, run_ort_job
from profilers.standalone_ort import ORT_PROVIDERS, ort_provider_list

INSTALL = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA; instead of onnxruntime, never both)"


def _available_providers() -> tuple[list[str] | None, str | None, str]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, None, f"onnxruntime is not importable ({e}); {INSTALL}"
    return ort.get_available_providers(), ort.__version__, ""


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    precisions = {"cpu": ("fp32", *RECIPES), "cuda": ("fp32", "fp16")}

    def availability(self, device: str) -> Availability:
        providers, version, why = _available_providers()
        if providers is None:
            return Availability(False, why)
        needed = ORT_PROVIDERS[device]
        if needed not in providers:
            return Availability(
                False,
                f"onnxruntime {version} has no {needed} (it has {', '.join(providers)}); "
                + ("install onnxruntime-gpu instead of onnxruntime" if device == "cuda" else INSTALL),
                version,
            )
        extra = (
            " (TensorRT EP too: --provider tensorrt)"
            if device == "cuda" and ORT_PROVIDERS["tensorrt"] in providers
            else ""
        )
        return Availability(True, f"{needed}{extra}", version)

    def provider(self, device: str, requested: str | None = None) -> str:
        if requested is None:
            return ORT_PROVIDERS[device]
        name = ORT_PROVIDERS.get(requested, requested)
        if device == "cpu" and name != ORT_PROVIDERS["cpu"]:
            raise NaspruneError(f"--provider {requested} needs --device cuda")
        providers, version, why = _available_providers()
        if providers is None:
            raise NaspruneError(why)
        if name not in providers:
            raise NaspruneError(
                f"onnxruntime {version} has no {name} (it has {', '.join(providers)}); "
                "choose --provider cpu, cuda or tensorrt from those"
            )
        return name

    def recipe(self, precision: str, exporter: str) -> dict:
        from compressor.quant.onnx_export import ExportRecipe

        recipe = ExportRecipe(exporter=exporter, precision=export_dtype(precision)).to_dict()
        quant = recipe_for(precision)
        if quant is not None:
            recipe["quantization"] = quant.to_dict()
        return recipe

    def prepare(
        self, model, directory: Path, recipe: dict, graphs: tuple[str, ...], provider: str | None = None
    ) -> Artifacts:
        from compressor.quant.onnx_export import ExportRecipe, export_graphs

        # fp32 parity runs on CPU (a check of the graph itself); fp16 on the provider that will time it
        check_on = ort_provider_list(provider, recipe["precision"]) if recipe["precision"] == "fp16" else None
        exported = export_graphs(model, directory, ExportRecipe.from_dict(recipe), graphs=graphs, providers=check_on)
        paths, sizes, extra = exported.paths, exported.graph_bytes, {}
        if recipe.get("quantization"):
            from compressor.core.precisions import needs_calibration
            from compressor.quant.onnx_export import graph_bytes
            from compressor.quant.quantize import StaticCalibration, quantize_graph_dir

            t = time.perf_counter()
            name = recipe["quantization"]["name"]
            # a static recipe's speed does not depend on its ranges: synthetic ids calibrate it for timing
            calibration = StaticCalibration.synthetic_ids() if needs_calibration(name) else None
            paths = quantize_graph_dir(directory, directory / "quantized", name, graphs, calibration)
            sizes = {k: graph_bytes(v) for k, v in paths.items()}
            extra = {"quantize_seconds": round(time.perf_counter() - t, 3)}
        return Artifacts(
            directory,
            {k: str(v) for k, v in paths.items()},
            sizes,
            {"seconds": exported.export_seconds, "parity_max_abs_diff": exported.parity, **extra},
        )

    def run_job(self, job: dict, protocol: Protocol) -> dict:
        return run_ort_job(job, protocol)


ENGINE = OnnxRuntimeEngine()
