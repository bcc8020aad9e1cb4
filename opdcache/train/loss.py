"""The OPD objective of the reference recipe (student top-k strategy), with Prune-OPD scaling.

For each valid response position tau and each of the student's k cached top-k ids j:

    w_{tau,j}  = softmax_k(log p_old(. | s_tau))_j          renormalised over the k cached ids
    r_{tau,j}  = -w_{tau,j} * (log p_old(j) - log q(j))      raw OPD reward (paper §2.1)
    A_{tau,j}  = L_tau * r_{tau,j}                           eq. 11 / eq. 13; used directly as the
                                                             advantage (token_reward_direct, App. A.7)
    rho_{tau,j} = pi_theta(j | s_tau) / p_old(j)
    l_{tau,j}  = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), and for A < 0 additionally
                 min(l, -A * c) (dual clip, c = 3)

The loss is sum_j l_{tau,j}, averaged over valid positions (token mean; ``tokens`` gives the count of
the whole mini-batch across micro-batches and ranks). p_old is the student's log-prob at the start of
the round's update, recomputed by the trainer (so rho = 1 at the first step, as in the reference), q
the cached teacher log-prob at the same id. log rho is clamped to [-20, 20] before exp, as in the
reference, so one wild token cannot make the loss inf.
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0


def opd_advantages(student_old: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A = L * r on ``[B, T, k]`` cached log-probs with ``[B, T]`` weights L (0 on padding)."""
    w = torch.softmax(student_old, dim=-1)
    return -w * (student_old - teacher) * weight.unsqueeze(-1)


def opd_policy_loss(
    logp: torch.Tensor,  # [B, T, k] current log pi_theta at the cached student top-k ids
    student_old: torch.Tensor,  # [B, T, k] cached rollout log-probs at those ids
    teacher: torch.Tensor,  # [B, T, k] cached teacher log-probs at those ids
    weight: torch.Tensor,  # [B, T] L_tau, 0 on padding
    mask: torch.Tensor,  # [B, T] bool, valid positions
    clip: float = 0.2,
    dual_clip: float = 3.0,
    tokens: torch.Tensor | float | None = None,  # valid positions of the whole mini-batch (default: mask's)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    adv = opd_advantages(student_old, teacher, weight).detach()
    ratio = torch.exp((logp - student_old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    clipped = torch.maximum(pg1, pg2)
    dual = torch.minimum(clipped, -adv * dual_clip)
    per_candidate = torch.where(adv < 0, dual, clipped)
    per_token = per_candidate.sum(-1)
    m = mask.to(per_token.dtype)
    n = (
        m.sum().clamp(min=1.0)
        if tokens is None
        else torch.as_tensor(tokens, dtype=per_token.dtype).clamp(min=1.0)
    )
    loss = (per_token * m).sum() / n
    with torch.no_grad():
        stats = {
            "clip_frac": ((pg2 > pg1).float().sum(-1) * m).sum() / (n * logp.shape[-1]),
            "reward": (adv.sum(-1) * m).sum() / n,
        }
    return loss, stats
