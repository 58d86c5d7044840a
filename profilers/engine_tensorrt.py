"""TensorRT: an engine built from the exported ONNX graph with the TensorRT Python API (10.x).

Per measured workload the engine is built with one optimization profile whose min = opt = max
is the measured shape (``generate``: the decode profile spans the cache lengths it walks
through), so TensorRT tunes its kernels for exactly what is timed, the way trtexec does with
``--shapes``. ``--precision fp16`` sets ``BuilderFlag.FP16`` on the fp32 graph (TensorRT keeps
fp32 where it must). Device buffers are torch CUDA tensors (no pycuda dependency); iterations
run with ``execute_async_v3`` on a torch stream and are timed with CUDA events + synchronize.

Not verified on hardware in this repository's CI (no GPU, no TensorRT); written against the
TensorRT 10 Python API documentation. The tests run where ``tensorrt`` and a GPU exist.
"""

from __future__ import annotations

import functools
from pathlib import Path

from profilers.base import Artifacts, Availability, Engine
from profilers.standalone import Protocol, fingerprint_id, host_fingerprint, make_fingerprint, timed

WORKSPACE_BYTES = 4 << 30


class TensorRTEngine(Engine):
    name = "tensorrt"
    precisions = {"cuda": ("fp32", "fp16")}

    def availability(self, device: str) -> Availability:
        if device != "cuda":
            return Availability(False, "TensorRT runs on NVIDIA GPUs only; use --device cuda")
        try:
            import tensorrt as trt
        except ImportError as e:
            return Availability(False, f"tensorrt is not importable ({e}); pip install tensorrt on a CUDA machine")
        try:
            import torch
        except ImportError:
            return Availability(False, "torch is needed for TensorRT device buffers", trt.__version__)
        if not torch.cuda.is_available():
            return Availability(
                False,
                f"torch {torch.__version__} sees no CUDA GPU (TensorRT buffers are torch CUDA "
                "tensors); install a CUDA torch",
                trt.__version__,
            )
        return Availability(True, f"TensorRT on {torch.cuda.get_device_name()}", trt.__version__)

    def recipe(self, precision: str, exporter: str) -> dict:
        from compressor.quant.onnx_export import ExportRecipe

        onnx = ExportRecipe(exporter=exporter, precision="fp32").to_dict()
        return {
            **onnx,
            "tensorrt": {
                "parser": "OnnxParser",
                "fp16": precision == "fp16",
                "profile": "min=opt=max=measured shape",
                "workspace_bytes": WORKSPACE_BYTES,
            },
        }

    def prepare(
        self, model, directory: Path, recipe: dict, graphs: tuple[str, ...], provider: str | None = None
    ) -> Artifacts:
        from compressor.quant.onnx_export import ExportRecipe, export_graphs

        exported = export_graphs(model, directory, ExportRecipe.from_dict(recipe), graphs=graphs)
        return Artifacts(
            directory,
            {k: str(v) for k, v in exported.paths.items()},
            exported.graph_bytes,
            {"seconds": exported.export_seconds, "parity_max_abs_diff": exported.parity},
        )

    def run_job(self, job: dict, protocol: Protocol) -> dict:
        import tensorrt as trt
        import torch

        w = job["workload"]
        holder: dict = {}

        def prepare():
            holder["runner"] = TrtRunner(job["files"], job["recipe"]["tensorrt"]["fp16"], w)
            return holder["runner"].step

        torch.cuda.reset_peak_memory_stats()
        result = timed(prepare, protocol)
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated()) + holder["runner"].engine_device_bytes
        result["fingerprint"] = make_fingerprint(
            host_fingerprint("cuda"),
            "tensorrt",
            trt.__version__,
            None,
            "cuda",
            job["precision"],
            job["threads"],
            job["recipe_id"],
            result["env"]["ref_score_before"],
        )
        result["fingerprint_id"] = fingerprint_id(result["fingerprint"])
        return result


@functools.lru_cache(maxsize=1)
def _logger():
    """One logger per process: TensorRT warns when builders and runtimes are given different ones."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: str, fp16: bool, shapes: dict[str, tuple[tuple, tuple, tuple]]):
    """Parse the ONNX file (external data beside it is found by path) and build a serialized
    engine (``IHostMemory``; ``bytes(...)`` of it is a ``.plan`` file) with one optimization
    profile: ``shapes`` maps each input to its (min, opt, max) shape."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    return serialized


class TrtRunner:
    """Engines for one workload, their buffers, and a step that runs one iteration."""

    def __init__(self, files: dict[str, str], fp16: bool, workload: dict):
        import torch

        self.torch = torch
        kind, b, s, n = workload["kind"], workload["batch"], workload["seq"], workload.get("new_tokens", 0)
        self.stream = torch.cuda.Stream()
        self.engine_device_bytes = 0
        self._runtimes: list = []
        if kind in ("prefill", "generate"):
            shapes = {"input_ids": ((b, s),) * 3, "attention_mask": ((b, s),) * 3}
            self.prefill = self._engine(files["prefill"], fp16, shapes)
        if kind in ("decode", "generate"):
            lo, hi = (s, s) if kind == "decode" else (s, s + n - 1)
            self.decode = self._engine(files["decode"], fp16, self._decode_shapes(files["decode"], b, lo, hi))
        self.step = {"prefill": self._prefill_step, "decode": self._decode_step, "generate": self._generate_step}[kind]
        self.b, self.s, self.n = b, s, n
        self._prefill_io = (
            self._io(self.prefill, {"input_ids": (b, s), "attention_mask": (b, s)}) if kind != "decode" else None
        )
        if kind == "decode":
            self._decode_io = self._io(self.decode, self._decode_inputs(b, s), random_past=True)
        if kind == "generate":
            self._steps = [self._io(self.decode, self._decode_inputs(b, s + i)) for i in range(n)]

    def _engine(self, path: str, fp16: bool, shapes: dict):
        import tensorrt as trt

        runtime = trt.Runtime(_logger())
        engine = runtime.deserialize_cuda_engine(build_engine(path, fp16, shapes))
        context = engine.create_execution_context()
        self._runtimes.append(runtime)  # the runtime must outlive the engines it deserialized
        self.engine_device_bytes += int(getattr(engine, "device_memory_size_v2", engine.device_memory_size))
        return engine, context

    def _decode_shapes(self, path: str, b: int, lo: int, hi: int) -> dict:
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        shapes = {"input_ids": ((b, 1),) * 3, "attention_mask": ((b, lo + 1), (b, hi + 1), (b, hi + 1))}
        for i in graph.input:
            if i.name.startswith("past_key_values."):
                _, heads, _, dim = [d.dim_value for d in i.type.tensor_type.shape.dim]
                shapes[i.name] = ((b, heads, lo, dim), (b, heads, hi, dim), (b, heads, hi, dim))
        self.kv = (heads, dim)
        return shapes

    def _decode_inputs(self, b: int, past: int) -> dict:
        heads, dim = self.kv
        shapes = {"input_ids": (b, 1), "attention_mask": (b, past + 1)}
        engine, _ = self.decode
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if name.startswith("past_key_values."):
                shapes[name] = (b, heads, past, dim)
        return shapes

    def _io(self, engine_context, input_shapes: dict, random_past: bool = False) -> dict:
        """Allocate inputs/outputs for fixed shapes; returns name -> tensor (outputs shaped by TensorRT)."""
        import tensorrt as trt

        torch = self.torch
        engine, context = engine_context
        tensors = {}
        for name, shape in input_shapes.items():
            dtype = _torch_dtype(engine.get_tensor_dtype(name))
            if name in ("input_ids", "attention_mask"):
                t = torch.ones(shape, dtype=dtype, device="cuda")
                if name == "input_ids":
                    t.random_(3, int(engine.get_tensor_shape("logits")[-1]))
            else:
                t = (
                    (torch.randn(shape, device="cuda") * 0.5).to(dtype)
                    if random_past
                    else torch.empty(shape, dtype=dtype, device="cuda")
                )
            context.set_input_shape(name, tuple(shape))
            tensors[name] = t
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(context.get_tensor_shape(name))
                tensors[name] = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
        return tensors

    def _execute(self, engine_context, tensors: dict) -> None:
        _, context = engine_context
        for name, t in tensors.items():
            if name in ("input_ids", "attention_mask") or name.startswith("past_key_values."):
                context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def _timed(self, body) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            body()
            end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end)

    def _prefill_step(self) -> float:
        return self._timed(lambda: self._execute(self.prefill, self._prefill_io))

    def _decode_step(self) -> float:
        return self._timed(lambda: self._execute(self.decode, self._decode_io))

    def _generate_step(self) -> float:
        def body():
            self._execute(self.prefill, self._prefill_io)
            previous = self._prefill_io
            for io in self._steps:
                io["input_ids"].copy_(previous["logits"].argmax(-1, keepdim=True))
                for name in io:
                    if name.startswith("past_key_values."):
                        io[name] = previous[name.replace("past_key_values.", "present.")]
                self._execute(self.decode, io)
                previous = io

        return self._timed(body)


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    return {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
    }[trt_dtype]


ENGINE = TensorRTEngine()
