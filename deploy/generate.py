"""Greedy generation on a bundle's ONNX prefill + decode graphs (proof the engine works end to end).

Prefill runs the prompt once and returns the last logits plus the KV cache; each decode step
feeds one token with the growing attention mask and the previous ``present.*`` tensors as
``past_key_values.*``. Only onnxruntime and numpy are needed at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.core.errors import NaspruneError


class OnnxGenerator:
    def __init__(self, prefill_path: Path, decode_path: Path, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        for p in (prefill_path, decode_path):
            if not Path(p).is_file():
                raise NaspruneError(f"ONNX graph {p} is missing; re-create the bundle with nasprune export")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.prefill = ort.InferenceSession(str(prefill_path), opts, providers=providers)
            self.decode = ort.InferenceSession(str(decode_path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
            raise NaspruneError(
                f"ONNX Runtime cannot load {prefill_path} / {decode_path} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); re-create the bundle with nasprune export"
            ) from None
        self.present = [o.name for o in self.prefill.get_outputs() if o.name.startswith("present.")]
        self.past = [i.name for i in self.decode.get_inputs() if i.name.startswith("past_key_values.")]
        if len(self.present) != len(self.past):
            raise NaspruneError("prefill and decode graphs do not belong together (KV cache names differ)")

    def greedy(self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """``input_ids [B, S]`` (int64) -> the generated tokens ``[B, <= max_new_tokens]``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids)
        outs = self.prefill.run(None, {"input_ids": ids, "attention_mask": mask})
        names = [o.name for o in self.prefill.get_outputs()]
        logits, cache = outs[names.index("logits")], [outs[names.index(n)] for n in self.present]
        generated = []
        for _ in range(max_new_tokens):
            token = logits.argmax(-1).astype(np.int64)[:, None]
            generated.append(token)
            if eos_token_id is not None and (token == eos_token_id).all():
                break
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            feed = {"input_ids": token, "attention_mask": mask, **dict(zip(self.past, cache))}
            outs = self.decode.run(None, feed)
            dnames = [o.name for o in self.decode.get_outputs()]
            logits = outs[dnames.index("logits")]
            cache = [outs[dnames.index(n)] for n in self.present]
        return np.concatenate(generated, axis=1)


def generate_text(bundle: Path, prompt: str, max_new_tokens: int = 32, variant: str = "fp32", chat: bool = True) -> str:
    """Decode ``prompt`` with the bundle's graphs (tokenizer from the bundle's checkpoint)."""
    from transformers import AutoTokenizer

    from deploy.bundle import engine_manifest, graph_paths

    bundle = Path(bundle)
    engine_manifest(bundle, variant)  # a nasprune bundle with this engine, unmodified
    try:
        tokenizer = AutoTokenizer.from_pretrained(bundle / "model")
    except Exception as e:  # noqa: BLE001
        raise NaspruneError(
            f"the tokenizer in {bundle / 'model'} cannot be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); re-create the bundle with nasprune export"
        ) from None
    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    ids = np.array([tokenizer(prompt, add_special_tokens=False).input_ids], dtype=np.int64)
    paths = graph_paths(bundle, variant)
    gen = OnnxGenerator(paths["prefill"], paths["decode"])
    out = gen.greedy(ids, max_new_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def onnx_mean_nll(gen: OnnxGenerator, ids: np.ndarray) -> float:
    """Mean next-token NLL of ``ids [1, N]`` through the engine itself (prefill 1 token, then decode).

    The prefill graph returns last-position logits only (what serving needs), so perplexity of an
    engine (e.g. the INT8 one) is measured token by token through the KV cache.
    """
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.ones_like(ids[:, :1])
    outs = gen.prefill.run(None, {"input_ids": ids[:, :1], "attention_mask": mask})
    names = [o.name for o in gen.prefill.get_outputs()]
    logits, cache = outs[names.index("logits")], [outs[names.index(n)] for n in gen.present]
    dnames = [o.name for o in gen.decode.get_outputs()]
    total = 0.0
    for t in range(1, ids.shape[1]):
        z = logits[0].astype(np.float64)
        total += float(np.logaddexp.reduce(z) - z[ids[0, t]])
        if t == ids.shape[1] - 1:
            break
        mask = np.ones((1, t + 1), dtype=np.int64)
        outs = gen.decode.run(
            None, {"input_ids": ids[:, t : t + 1], "attention_mask": mask, **dict(zip(gen.past, cache))}
        )
        logits, cache = outs[dnames.index("logits")], [outs[dnames.index(n)] for n in gen.present]
    return total / (ids.shape[1] - 1)
