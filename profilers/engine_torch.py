"""torch eager: the baseline every exported engine is compared against.

The timed programs are the same wrappers that are exported to ONNX (``PrefillGraph``,
``DecodeGraph``: last-position logits and the KV cache), so torch and ONNX Runtime numbers
measure the same computation. CPU iterations are timed with ``perf_counter``; CUDA iterations
with CUDA events on the current stream followed by ``synchronize`` (kernel launches are
asynchronous: a host clock would time the launches, not the kernels).
"""

from __future__ import annotations

import time
from pathlib import Path

from profilers.base import Artifacts, Availability, Engine
from profilers.standalone import Protocol, fingerprint_id, host_fingerprint, make_fingerprint, timed

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
RECIPE_FORMAT = "nasprune-torch/1"


class TorchEngine(Engine):
    name = "torch"
    precisions = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}

    def availability(self, device: str) -> Availability:
        try:
            import torch
        except ImportError as e:
            return Availability(False, f"torch is not importable ({e})")
        version = torch.__version__
        if device == "cuda" and not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "built for CUDA but sees no GPU"
            return Availability(False, f"torch {version} is {why}; install a CUDA torch on a GPU machine", version)
        return Availability(
            True, "eager" + (f" on {torch.cuda.get_device_name()}" if device == "cuda" else ""), version
        )

    def recipe(self, precision: str, exporter: str) -> dict:
        import torch
        import transformers

        return {
            "format": RECIPE_FORMAT,
            "runtime": "eager",
            "precision": precision,
            "attn_implementation": "sdpa",
            "graphs": {
                "prefill": "compressor.quant.onnx_export.PrefillGraph",
                "decode": "compressor.quant.onnx_export.DecodeGraph",
            },
            "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
        }

    def prepare(
        self, model, directory: Path, recipe: dict, graphs: tuple[str, ...], provider: str | None = None
    ) -> Artifacts:
        """Save the extracted model (safetensors) for the worker process to load."""
        path = Path(directory) / "model"
        model.save_pretrained(path, safe_serialization=True)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return Artifacts(Path(directory), {"model": str(path)}, {"model": size}, {})

    def run_job(self, job: dict, protocol: Protocol) -> dict:
        import torch

        w, device = job["workload"], job["device"]
        torch.set_num_threads(job["threads"])

        def prepare():
            from transformers import AutoModelForCausalLM

            model = (
                AutoModelForCausalLM.from_pretrained(
                    job["files"]["model"], dtype=getattr(torch, DTYPES[job["precision"]]), attn_implementation="sdpa"
                )
                .eval()
                .to(device)
            )
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            return _step(model, device, w["kind"], w["batch"], w["seq"], w.get("new_tokens", 0))

        result = timed(prepare, protocol)
        if device == "cuda":
            result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        result["fingerprint"] = make_fingerprint(
            host_fingerprint(device),
            "torch",
            torch.__version__,
            None,
            device,
            job["precision"],
            job["threads"],
            job["recipe_id"],
            result["env"]["ref_score_before"],
        )
        result["fingerprint_id"] = fingerprint_id(result["fingerprint"])
        return result


def _step(model, device: str, kind: str, batch: int, seq: int, new_tokens: int):
    import torch

    from compressor.quant.onnx_export import DecodeGraph, PrefillGraph, kv_shape, num_layers

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g).to(device)
    dtype = next(model.parameters()).dtype
    prefill, decode = PrefillGraph(model), DecodeGraph(model)
    if kind == "prefill":
        args = (ids, torch.ones(batch, seq, dtype=torch.int64, device=device))
        run = lambda: prefill(*args)  # noqa: E731
    elif kind == "decode":
        past = [
            torch.randn(kv_shape(model, batch, seq), generator=g).to(device, dtype) * 0.5
            for _ in range(2 * num_layers(model))
        ]
        args = (ids[:, :1], torch.ones(batch, seq + 1, dtype=torch.int64, device=device), *past)
        run = lambda: decode(*args)  # noqa: E731
    else:
        masks = [torch.ones(batch, seq + i, dtype=torch.int64, device=device) for i in range(new_tokens + 1)]

        def run():
            out = prefill(ids, masks[0])
            for i in range(new_tokens):
                token = out[0].argmax(-1, keepdim=True)
                out = decode(token, masks[i + 1], *out[1:])
            return out

    def cpu_step() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            run()
            return (time.perf_counter() - t) * 1e3

    def cuda_step() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode():
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    return cuda_step if device == "cuda" else cpu_step


ENGINE = TorchEngine()
