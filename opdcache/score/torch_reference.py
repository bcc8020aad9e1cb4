"""Straightforward torch version of eqs. 6-12 on padded ``[B, T, k]`` tensors.

This is the shape the paper's released code works on (App. A.7). It is the executable spec that
tests compare :mod:`opdcache.score.reliability` against, and the baseline of
``benchmarks/score_throughput.py``; the score stage does not use it.
"""

from __future__ import annotations

import torch


def prune_opd_weights(
    student_ids: torch.Tensor,  # [B, T, k]
    teacher_ids: torch.Tensor,  # [B, T, k]
    mask: torch.Tensor,  # [B, T] bool, True on valid response positions
    gamma: float = 0.7,
    w_drop: float = 0.01,
    w_base: float = 0.5,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    k = student_ids.shape[-1]
    overlap = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(-1).sum(-1).float() / k  # eq. 6
    bad = (overlap < gamma) & mask  # eq. 7, valid positions only
    cum = bad.long().cumsum(-1)  # eq. 8, inclusive
    rel = (1.0 - w_drop * cum.float()).clamp(0.0, 1.0) * mask  # eq. 9, zero on padding
    weight = (rel + w_base) * mask  # eq. 10
    eff = (rel > eps).sum(-1)  # eq. 12
    return {
        "overlap": overlap,
        "bad": bad,
        "cumulative": cum,
        "reliability": rel,
        "weight": weight,
        "effective_len": eff,
    }
