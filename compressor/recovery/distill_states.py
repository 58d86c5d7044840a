"""Intermediate-state distillation: the student's residual stream follows the teacher's, block by block.

Why: logit KD tells a pruned student *what* to output but not how to get there. Minitron
(arXiv 2407.14679) adds a loss on intermediate hidden states when depth is pruned: the student's
remaining blocks are guided towards the states the teacher computes at the same point of the
network. This module supplies that term for refine, where the student is one extracted
sub-network and the teacher the unpruned parent it was cut from.

Which teacher state a student block should reproduce. The student kept the parent's layers
``kept = [k_0 < k_1 < ...]`` (first-k after the importance permutation: the parent's first
``embed_dim`` channels are its most important). Its block ``j`` replaces the parent's layers
``k_j .. k_{j+1} - 1`` (the kept one and the dropped ones after it), so its output should be the
parent's residual stream just *before* layer ``k_{j+1}``, which is what the student's next block
reads; the last student block replaces everything up to the parent's last layer, whose output the
logit KD also targets. A student of full depth therefore matches block for block, and the
student is the teacher at initialization iff this loss is zero. Compared on the student's
``embed_dim`` channels of the parent's stream.

Loss: normalized MSE per block, ``||s - t||^2 / ||t||^2`` over the supervised positions (the
residual stream's scale grows with depth, so unnormalized MSE would be the last blocks' loss
alone), averaged over the student's blocks. Same form as block-local distillation
(:mod:`compressor.recovery.bld`), which trains blocks on teacher inputs; here the student runs end to end on
its own states.

Cost: the teacher's states are not cached (24 x 576 fp16 values per token would be 28 KB, 70x
the top-k logits), so every step runs the teacher's blocks once more, without its LM head.
"""

from __future__ import annotations

import torch


def teacher_layer_targets(kept: list[int], teacher_layers: int) -> list[int]:
    """For each student block (the parent's layers ``kept``, ascending), the parent layer whose
    *output* it should reproduce: the one before the next kept layer; the parent's last for the last."""
    if not kept or sorted(kept) != list(kept) or len(set(kept)) != len(kept):
        raise ValueError(f"kept layers must be distinct and ascending, not {kept}")
    if kept[0] < 0 or kept[-1] >= teacher_layers:
        raise ValueError(f"kept layers {kept} are outside the teacher's {teacher_layers} layers")
    return [nxt - 1 for nxt in kept[1:]] + [teacher_layers - 1]


@torch.no_grad()
def teacher_states(teacher, input_ids: torch.Tensor, attention_mask, wanted: list[int]) -> list[torch.Tensor]:
    """The teacher's (a :class:`compressor.elastic.supernet.SuperNetwork` at its largest sub-network) residual
    stream after each block in ``wanted``, in that order; its LM head never runs."""
    want = set(wanted)
    out: dict[int, torch.Tensor] = {}
    for i, (_, y) in zip(teacher.space.kept_layers(teacher.active), teacher.block_io(input_ids, attention_mask)):
        if i in want:
            out[i] = y
        if len(out) == len(want):
            break
    return [out[i] for i in wanted]


def state_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], supervised: torch.Tensor | None
) -> torch.Tensor:
    """Mean over blocks of ``||s - t[..., :d]||^2 / ||t[..., :d]||^2`` on the positions where
    ``supervised`` ([B, T] bool) is true (all when None); ``d`` is the student's width."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student states for {len(teacher)} teacher states")
    losses = []
    for s, t in zip(student, teacher):
        t = t[..., : s.shape[-1]].to(s.dtype)
        err, ref = (s - t).pow(2).sum(-1), t.pow(2).sum(-1)
        if supervised is not None:
            m = supervised.to(s.dtype)
            err, ref = err * m, ref * m
        losses.append(err.sum() / ref.sum().clamp_min(1e-12))
    return torch.stack(losses).mean()
