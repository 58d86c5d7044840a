"""Held-out perplexity of any sub-network (through the super-network or an extracted model)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compressor.core.data import PACKAGE_DATA  # noqa: F401  (re-exported for callers of evaluate)
from compressor.core.errors import NaspruneError


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[N, seq_len]`` of the tokenized text (the tail is dropped)."""
    from compressor.core.data import pack_text

    return pack_text(tokenizer, text, seq_len, max_tokens, source="held-out text").input_ids


@torch.no_grad()
def mean_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy over all windows (token-weighted)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        logits = logits_fn(ids)[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return total / count


def perplexity(logits_fn, windows: torch.Tensor, batch_size: int = 4) -> float:
    return math.exp(mean_loss(logits_fn, windows, batch_size))


def hf_logits(model):
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def write_local_tasks(task_files: list[Path], directory: Path) -> list[str]:
    """lm-eval YAML for local multiple-choice jsonl files (rows: context, choices, label)."""
    import yaml

    names = []
    for f in task_files:
        f = Path(f).resolve()
        if not f.is_file():
            raise NaspruneError(f"task file {f} does not exist")
        first = json.loads(f.open().readline() or "{}")
        if not {"context", "choices", "label"} <= set(first):
            raise NaspruneError(f"{f}: rows need 'context', 'choices' and 'label' (multiple-choice task format)")
        name = f.stem
        spec = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(f)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names.append(name)
    return names


def lm_eval_tasks(
    model, tokenizer, tasks: list[str], include_path: Path | None = None, limit: int | None = None, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """lm-eval ``simple_evaluate`` on an in-memory model; returns {task: {metric: value}}."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise NaspruneError(
            f"unknown lm-eval task(s) {unknown}; give --task-file for local jsonl tasks or --include-path"
        )
    try:
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    except Exception as e:  # noqa: BLE001 - dataset download failures etc.
        raise NaspruneError(
            f"lm-eval failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "standard tasks need --online and a reachable hub"
        ) from None
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k and k not in ("alias", "sample_len")
        }
    return results


def evaluate_subnetwork(
    loaded,
    sub=None,
    data: str | None = None,
    tasks: str | None = None,
    task_files=None,
    include_path: Path | None = None,
    limit: int | None = None,
    seq_len: int = 512,
    max_tokens: int = 32768,
    via: str = "both",
    online: bool = False,
) -> dict:
    """Perplexity through the super-network and/or the extracted model, plus lm-eval tasks."""
    import tempfile

    from compressor.core.data import read_source
    from compressor.elastic.extract import extract

    if via not in ("supernet", "extracted", "both"):
        raise NaspruneError(f"--via must be supernet, extracted or both (got {via})")
    sn = loaded.supernet()
    sub = sn.space.validate(sub) if sub is not None else sn.space.largest()
    result = {"arch": sub.to_dict(), "params": sn.space.num_params(sub)}
    extracted = None
    if data:
        kind, text = read_source(data, online)
        if kind != "text":
            raise NaspruneError("perplexity needs plain text (.txt); use --tasks for instruction/choice data")
        windows = token_windows(loaded.tokenizer, text, seq_len, max_tokens)
        result["ppl_tokens"] = int(windows.numel())
        if via in ("supernet", "both"):
            sn.eval().select(sub)
            result["ppl_supernet"] = perplexity(sn, windows)
        if via in ("extracted", "both"):
            extracted = extract(sn, sub)
            result["ppl_extracted"] = perplexity(hf_logits(extracted), windows)
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if names or task_files:
        extracted = extracted if extracted is not None else extract(sn, sub)
        with tempfile.TemporaryDirectory() as tmp:
            local = write_local_tasks(list(task_files or []), Path(tmp)) if task_files else []
            inc = include_path
            if local:
                if include_path:
                    for f in Path(include_path).glob("*.y*ml"):
                        (Path(tmp) / f.name).write_text(f.read_text())
                inc = Path(tmp)
            result["tasks"] = lm_eval_tasks(extracted, loaded.tokenizer, names + local, inc, limit)
    return result
