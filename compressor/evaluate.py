"""Held-out perplexity of any sub-network (through the super-network or an extracted model)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compressor.errors import NaspruneError

PACKAGE_DATA = Path(__file__).parent / "data"


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise NaspruneError(f"text file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NaspruneError(f"{path} is not UTF-8 text") from None


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[N, seq_len]`` of the tokenized text (the tail is dropped)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise NaspruneError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}; give more text or a smaller --seq-len")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def mean_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy over all windows (token-weighted)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i: i + batch_size]
        logits = logits_fn(ids)[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return total / count


def perplexity(logits_fn, windows: torch.Tensor, batch_size: int = 4) -> float:
    return math.exp(mean_loss(logits_fn, windows, batch_size))


def hf_logits(model):
    return lambda ids: model(input_ids=ids, use_cache=False).logits
