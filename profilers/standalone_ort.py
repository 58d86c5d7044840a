"""The ONNX Runtime runner: sessions with IO binding and the per-iteration step of each workload kind.

Like ``profilers.standalone`` (which times it), this file needs only the Python standard library,
numpy and onnxruntime: ``nasprune profile --export-only DIR`` copies it next to ``DIR/run_profile.py``
(a copy of ``standalone.py``), which imports it from there on a device without nasprune. Keep it so:
no import of torch, transformers or any nasprune package here.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def ort_provider_list(provider: str, precision: str) -> list:
    """Provider list for a session. The TensorRT EP gets its FP16 switch; it builds an engine per
    new input shape during warm-up (the protocol's warm-up runs until count *and* time are met)."""
    if provider == "TensorrtExecutionProvider":
        return [(provider, {"trt_fp16_enable": precision == "fp16"}), "CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "CUDAExecutionProvider":
        return [provider, "CPUExecutionProvider"]
    return [provider]


class OrtRunner:
    """One workload on exported graphs, with IO binding for every input and output.

    The KV cache never leaves the provider's memory: ``present`` outputs are bound on the
    device and fed back as the next step's ``past`` OrtValues (CPU included, so every provider
    runs the same code path and no step pays a copy). Only the small last-position logits are
    bound to the host, where ``generate`` takes the argmax, as a serving loop would.
    """

    def __init__(self, graphs: dict[str, str], provider: str, precision: str, threads: int, device_id: int = 0):
        import onnxruntime as ort

        self.ort, self.provider, self.device_id = ort, provider, device_id
        self.device_type = "cpu" if provider == "CPUExecutionProvider" else "cuda"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = ort_provider_list(provider, precision)
        self.sessions = {
            name: ort.InferenceSession(str(path), opts, providers=providers) for name, path in graphs.items()
        }
        for s in self.sessions.values():
            if s.get_providers()[0] != provider:
                raise RuntimeError(f"{provider} could not take the graph (session runs on {s.get_providers()})")
        graph = self.sessions.get("decode") or self.sessions["prefill"]
        out = graph.get_outputs()
        self.present = [o.name for o in out[1:]]
        self.vocab = out[0].shape[-1]
        _, self.kv_heads, _, self.head_dim = out[1].shape
        self.kv_dtype = np.float16 if "float16" in out[1].type else np.float32
        self.num_layers = len(self.present) // 2
        self.rng = np.random.default_rng(0)

    def _value(self, array):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def _run(self, graph: str, inputs: dict) -> list:
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for o in session.get_outputs():  # logits [B, vocab] to the host (argmax there), the KV cache stays put
            binding.bind_output(o.name, "cpu" if o.name == "logits" else self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _tokens(self, batch: int, length: int):
        return self._value(self.rng.integers(3, self.vocab, (batch, length), dtype=np.int64))

    def _mask(self, batch: int, length: int):
        return self._value(np.ones((batch, length), dtype=np.int64))

    def _past(self, batch: int, length: int) -> dict:
        shape = (batch, self.kv_heads, length, self.head_dim)
        names = [n.replace("present.", "past_key_values.") for n in self.present]
        return {n: self._value((self.rng.standard_normal(shape) * 0.5).astype(self.kv_dtype)) for n in names}

    def step_for(self, kind: str, batch: int, seq: int, new_tokens: int = 0) -> Callable[[], float]:
        """A closure that runs one iteration of the workload and returns its wall time in ms.

        ORT's ``Run`` synchronizes the provider's stream before returning, so wall time is
        device time plus launch overhead on CUDA as well.
        """
        if kind == "prefill":
            inputs = {"input_ids": self._tokens(batch, seq), "attention_mask": self._mask(batch, seq)}
            return self._clocked(lambda: self._run("prefill", inputs))
        if kind == "decode":
            inputs = {
                "input_ids": self._tokens(batch, 1),
                "attention_mask": self._mask(batch, seq + 1),
                **self._past(batch, seq),
            }
            return self._clocked(lambda: self._run("decode", inputs))
        if kind == "generate":
            prompt = {"input_ids": self._tokens(batch, seq), "attention_mask": self._mask(batch, seq)}
            masks = [self._mask(batch, seq + i + 1) for i in range(new_tokens)]
            past_names = [n.replace("present.", "past_key_values.") for n in self.present]

            def generate():
                out = self._run("prefill", prompt)
                for i in range(new_tokens):
                    token = out[0].numpy().argmax(-1).astype(np.int64).reshape(batch, 1)
                    feed = {
                        "input_ids": self._value(token),
                        "attention_mask": masks[i],
                        **dict(zip(past_names, out[1:])),
                    }
                    out = self._run("decode", feed)
                return out

            return self._clocked(generate)
        raise ValueError(f"unknown workload kind {kind}")

    @staticmethod
    def _clocked(fn: Callable) -> Callable[[], float]:
        def step() -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        return step


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
