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


def _ppo_clipped(
    adv: torch.Tensor, ratio: torch.Tensor, clip: float, dual_clip: float
) -> tuple[torch.Tensor, ...]:
    """(per-element clipped loss, pg1, pg2): max(-A rho, -A clip(rho)), and for A < 0 at most -A c."""
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    clipped = torch.maximum(pg1, pg2)
    dual = torch.minimum(clipped, -adv * dual_clip)
    return torch.where(adv < 0, dual, clipped), pg1, pg2


def _ratio(logp: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _token_mean(
    per_token: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mask as floats, token count): the per-token loss summed over valid positions and divided
    by ``tokens`` (the whole mini-batch's, all ranks) or, without it, by the mask's own count."""
    m = mask.to(per_token.dtype)
    n = (
        m.sum().clamp(min=1.0)
        if tokens is None
        else torch.as_tensor(tokens, dtype=per_token.dtype).clamp(min=1.0)
    )
    return (per_token * m).sum() / n, m, n


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
    per_candidate, pg1, pg2 = _ppo_clipped(adv, _ratio(logp, student_old), clip, dual_clip)
    per_token = per_candidate.sum(-1)
    loss, m, n = _token_mean(per_token, mask, tokens)
    with torch.no_grad():
        stats = {
            "clip_frac": ((pg2 > pg1).float().sum(-1) * m).sum() / (n * logp.shape[-1]),
            "reward": (adv.sum(-1) * m).sum() / n,
        }
    return loss, stats


def hybrid_policy_loss(
    logp: torch.Tensor,  # [B, T, k] current log pi_theta at the cached student top-k ids
    student_old: torch.Tensor,  # [B, T, k] old log-probs at those ids
    teacher: torch.Tensor,  # [B, T, k] teacher log-probs at those ids
    weight: torch.Tensor,  # [B, T] L_tau, 0 on padding
    mask: torch.Tensor,  # [B, T] bool, valid positions
    logp_y: torch.Tensor,  # [B, T] current log pi_theta of the sampled token y_tau
    old_y: torch.Tensor,  # [B, T] its old log-prob (the trainer's recompute)
    grpo_adv: torch.Tensor,  # [B] the response's GRPO advantage x train.grpo.coef
    opd_on: torch.Tensor,  # [B, T] bool: positions trained by the OPD term
    grpo_on: torch.Tensor,  # [B, T] bool: positions trained by the GRPO term
    clip: float = 0.2,
    dual_clip: float = 3.0,
    tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """OPD x L where ``opd_on``, plus the sampled token's PPO-clipped GRPO loss where ``grpo_on``
    (issue 24; paper App. A.4). The gated arm (prune-grpo) sets opd_on = R > 0 and grpo_on = R = 0;
    ``sum`` mode (the peers' form) both everywhere; the grpo arm only grpo_on. Token mean over all
    valid positions, as the OPD loss; where only ``opd_on`` is set the loss is ``opd_policy_loss``'s
    exactly (the GRPO term is selected away, not multiplied by 0)."""
    adv = opd_advantages(student_old, teacher, weight).detach()
    per_candidate, pg1, pg2 = _ppo_clipped(adv, _ratio(logp, student_old), clip, dual_clip)
    opd_token = per_candidate.sum(-1)
    a_y = grpo_adv.detach()[:, None].expand_as(logp_y)
    grpo_token, g1, g2 = _ppo_clipped(a_y, _ratio(logp_y, old_y), clip, dual_clip)
    zero = torch.zeros_like(opd_token)
    per_token = torch.where(opd_on, opd_token, zero) + torch.where(grpo_on, grpo_token, zero)
    per_token = torch.where(opd_on & ~grpo_on, opd_token, per_token)
    loss, m, n = _token_mean(per_token, mask, tokens)
    with torch.no_grad():
        om, gm = (opd_on & mask).to(m.dtype), (grpo_on & mask).to(m.dtype)
        stats = {
            "clip_frac": ((pg2 > pg1).float().sum(-1) * om).sum() / (n * logp.shape[-1]),
            "reward": (adv.sum(-1) * om).sum() / n,
            "grpo_clip_frac": ((g2 > g1).float() * gm).sum() / n,
            "grpo_tokens": gm.sum(),
            "grpo_advantage": (a_y * gm).sum() / n,  # over all valid tokens, like reward (sums over ranks)
        }
    return loss, stats
