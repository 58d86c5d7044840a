"""The primitives of the super-network forward: linear layers on weight views, rotary, attention.

Every family's block (:mod:`compressor.elastic.architectures`) is written with these, so a
sub-network runs on views of the shared weights without copies, LoRA adapters are sliced with their
base layer, and a simulated quantization (:mod:`compressor.elastic.quant_sim`) reaches every matmul
through the one call :func:`elastic_linear`. They hold no architecture knowledge of their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.elastic import quant_sim


def elastic_linear(module: torch.nn.Module, x: torch.Tensor, rows: slice, cols: int) -> torch.Tensor:
    """``module(x)`` on the weight view ``W[rows, :cols]`` (no copy).

    A peft LoRA layer is sliced the same way: ``A[:, :cols]`` reads the kept inputs and
    ``B[rows]`` writes the kept outputs, so a sub-network's adapter is the slice of the
    super-network's adapter (peft's own forward cannot take sliced inputs).
    """
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    bias = base.bias[rows] if base.bias is not None else None
    out = quant_sim.linear(base, x, base.weight[rows, :cols], bias)  # F.linear unless a quantization is simulated
    if (
        hasattr(module, "lora_A")
        and not getattr(module, "merged", False)
        and not getattr(module, "disable_adapters", False)
    ):
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a = module.lora_A[name].weight[:, :cols]
            b = module.lora_B[name].weight[rows]
            out = out + F.linear(F.linear(module.lora_dropout[name](x), a), b) * module.scaling[name]
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding on the first ``cos.shape[-1]`` dims of each head (partial rotary for Phi/NeoX)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]

    def rope(t):
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        t_rot = t_rot * cos + rotate_half(t_rot) * sin
        return torch.cat([t_rot, t_pass], dim=-1) if t_pass.shape[-1] else t_rot

    return rope(q), rope(k)


def attention(q, k, v, attention_mask, scale, window: int | None = None, softcap: float | None = None):
    """Causal attention with GQA. q: [B,H,T,D], k/v: [B,G,T,D]; attention_mask: optional [B,T] padding mask.

    ``window``: sliding-window attention as Hugging Face defines it, a query at position i sees keys
    j with i - window < j <= i. ``softcap``: Gemma 2's tanh soft-capping of the attention logits
    (``cap * tanh(logits / cap)`` before the mask), which SDPA cannot express, so that path runs eagerly.
    """
    t = q.shape[-2]
    mask = None
    if attention_mask is not None or window is not None or softcap is not None:
        pos = torch.arange(t, device=q.device)
        mask = pos[None, :] <= pos[:, None]
        if window is not None:
            mask = mask & (pos[None, :] > pos[:, None] - window)
        mask = mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # a padded query row may see nothing; let it see itself so no NaN reaches the gradients
            mask = mask | torch.eye(t, dtype=torch.bool, device=q.device)[None, None]
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
