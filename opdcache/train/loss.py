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

import math
from dataclasses import dataclass

import torch

from opdcache.config import OBJECTIVES

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
    """The ``student-topk`` objective (the paper's released code) on its own inputs."""
    return policy_loss(
        "student-topk", Terms(logp, student_old, teacher, weight, mask), clip, dual_clip, tokens
    )


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
    (issue 24; paper App. A.4), with the ``student-topk`` objective as the OPD term (``policy_loss``
    takes any). The gated arm (prune-grpo) sets opd_on = R > 0 and grpo_on = R = 0; ``sum`` mode (the
    peers' form) both everywhere; the grpo arm only grpo_on. Token mean over all valid positions, as the
    OPD loss; where only ``opd_on`` is set the loss is ``opd_policy_loss``'s exactly (the GRPO term is
    selected away, not multiplied by 0)."""
    terms = Terms(logp, student_old, teacher, weight, mask, logp_y=logp_y, old_y=old_y)
    return policy_loss("student-topk", terms, clip, dual_clip, tokens, grpo=(grpo_adv, opd_on, grpo_on))


# --- objectives (issue 30) ------------------------------------------------------------------------
#
# Every objective below is a per-position loss scaled by Prune-OPD's L_tau, token-meaned as above.
# U_tau = the student's cached top-k ids ∪ the teacher's cached top-k ids, R_tau = the rest of the
# vocabulary; P_R / Q_R the student's (trainer's full softmax) / teacher's (1 - its cached mass on U)
# mass in R, l_R = log(P_R / Q_R), d_v = log p_v - log q_v.

# Q_R floor: 1 - sum_U q from fp32 log-probs carries ~1e-6 of rounding, so a smaller Q_R is noise
# (distill/teacher_rest_floor_frac logs how often it applies)
TEACHER_REST_MIN = 1e-5
REST_OBJECTIVES = ("bucket", "sum-and-sample")  # the objectives that train on log P_R and the teacher's ids


@dataclass
class Terms:
    """What the objectives read at each response position: ``[B, T, k]`` or ``[B, T]`` tensors.

    ``logp`` / ``logp_t`` / ``log_rest`` / ``logp_y`` carry the gradient (current student); the rest are
    fixed (the trainer's recomputed old log-probs, the teacher cache). ``entropy`` and ``topk_mass``
    are diagnostics (no gradient)."""

    logp: torch.Tensor  # log p_theta at the student's top-k ids
    old: torch.Tensor  # old log-probs at those ids
    teacher: torch.Tensor  # log q at those ids (teacher_logprob_on_student_topk)
    weight: torch.Tensor  # L_tau, 0 on padding
    mask: torch.Tensor  # bool, valid positions
    logp_t: torch.Tensor | None = None  # log p_theta at the teacher's top-k ids
    teacher_t: torch.Tensor | None = None  # log q at those ids (teacher_topk_logprobs)
    new_t: torch.Tensor | None = None  # bool: teacher id not among the student's top-k (U's other half)
    log_rest: torch.Tensor | None = None  # log P_R
    logp_y: torch.Tensor | None = None  # log p_theta(y_tau), the sampled token
    old_y: torch.Tensor | None = None  # its old log-prob
    teacher_y: torch.Tensor | None = None  # log q(y_tau) (teacher_logprob)
    y_in_rest: torch.Tensor | None = None  # bool: y_tau in R
    sampler_weight: torch.Tensor | None = None  # p_old(y) / p_old,T(y): y drawn at rollout temperature T
    entropy: torch.Tensor | None = None  # the student's full-vocabulary entropy


def teacher_log_rest(t: Terms) -> torch.Tensor:
    """log Q_R = log(1 - sum_{v in U} q_v), in float64, floored at TEACHER_REST_MIN."""
    q_u = t.teacher.double().exp().sum(-1) + (t.teacher_t.double().exp() * t.new_t).sum(-1)
    return torch.log((1.0 - q_u).clamp(min=TEACHER_REST_MIN)).to(t.logp.dtype)


def bucket_kl(t: Terms) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL of p and q coarse-grained to U + one bucket R, l_R): sum_{v in U} p_v d_v + P_R l_R, per
    position, differentiable in the student's log-probs; >= 0 and <= the full reverse KL."""
    p_s, p_t = t.logp.exp(), t.logp_t.exp()
    kl_u = (p_s * (t.logp - t.teacher)).sum(-1) + (p_t * (t.logp_t - t.teacher_t) * t.new_t).sum(-1)
    ell = t.log_rest - teacher_log_rest(t)
    p_rest = t.log_rest.exp()
    # P_R = 0 (U the whole vocabulary) contributes 0, not 0 * -inf
    return kl_u + torch.where(p_rest > 0, p_rest * ell, torch.zeros_like(ell)), ell


def _student_topk(t: Terms, clip: float, dual_clip: float, clamp: float) -> tuple[torch.Tensor, dict]:
    adv = opd_advantages(t.old, t.teacher, t.weight).detach()
    per_candidate, pg1, pg2 = _ppo_clipped(adv, _ratio(t.logp, t.old), clip, dual_clip)
    return per_candidate.sum(-1), {
        "clip_frac": (pg2 > pg1).to(adv.dtype).mean(-1),
        "reward": adv.sum(-1),
    }


def _bucket(t: Terms, clip: float, dual_clip: float, clamp: float) -> tuple[torch.Tensor, dict]:
    kl, _ = bucket_kl(t)
    per_token = t.weight * kl
    return per_token, {"reward": -per_token.detach(), "clip_frac": torch.zeros_like(kl).detach()}  # no ratio


def _sum_and_sample(t: Terms, clip: float, dual_clip: float, clamp: float) -> tuple[torch.Tensor, dict]:
    """The bucket plus, where y_tau lies in R, rho_y * sg(d_y - l_R) (PPO-clipped ratio): with y ~ p its
    expected gradient is the rest of sum_V p_v d_v grad log p_v (Rao-Blackwellised; Liu et al. 2019).
    Rollouts at T != 1 draw y from p_T: the residual is importance-weighted by p(y) / p_T(y) (1 at T = 1)."""
    kl, ell = bucket_kl(t)
    # d_y at the current parameters (the gradient's point), as l_R; sampled-token uses p_old (tinker's)
    resid = torch.where(t.y_in_rest, t.logp_y - t.teacher_y - ell, torch.zeros_like(ell)).detach()
    adv = -t.weight * resid.clamp(-clamp, clamp)
    if t.sampler_weight is not None:
        adv = adv * t.sampler_weight
    res, g1, g2 = _ppo_clipped(adv, _ratio(t.logp_y, t.old_y), clip, dual_clip)
    on = t.y_in_rest & t.mask
    per_token = t.weight * kl + torch.where(on, res, torch.zeros_like(res))
    return per_token, {
        "reward": -(t.weight * kl).detach() + torch.where(on, adv, torch.zeros_like(adv)),
        "clip_frac": ((g2 > g1) & on).to(adv.dtype),
        "residual_clamp_frac": ((resid.abs() > clamp) & on).to(adv.dtype),
    }


def _sampled_token(t: Terms, clip: float, dual_clip: float, clamp: float) -> tuple[torch.Tensor, dict]:
    """tinker-cookbook's form: advantage -(log p_old(y) - log q(y)) x L on the sampled token."""
    adv = (-(t.old_y - t.teacher_y) * t.weight).detach()
    per_token, g1, g2 = _ppo_clipped(adv, _ratio(t.logp_y, t.old_y), clip, dual_clip)
    return per_token, {"reward": adv, "clip_frac": (g2 > g1).to(adv.dtype)}


OBJECTIVE_FNS = {
    "student-topk": _student_topk,
    "bucket": _bucket,
    "sum-and-sample": _sum_and_sample,
    "sampled-token": _sampled_token,
}


def diagnostics(t: Terms) -> dict[str, torch.Tensor]:
    """Per-position diagnostics logged every step (whatever the objective): the student's top-k mass,
    P_R, Q_R, l_R, y_tau in R, the full-vocabulary entropy."""
    with torch.no_grad():
        out = {"student_topk_mass": t.logp.exp().sum(-1)}
        if t.log_rest is not None:
            log_q_rest = teacher_log_rest(t)
            out |= {
                "rest_mass": t.log_rest.exp(),
                "teacher_rest_mass": log_q_rest.exp(),
                "rest_log_ratio": t.log_rest - log_q_rest,
            }
            out["teacher_rest_floor_frac"] = (log_q_rest <= math.log(TEACHER_REST_MIN) + 1e-6).to(
                t.logp.dtype
            )
        if t.y_in_rest is not None:
            out["sampled_in_rest"] = t.y_in_rest.to(t.logp.dtype)
        if t.sampler_weight is not None:
            out["sampler_weight"] = t.sampler_weight.to(t.logp.dtype)
        if t.entropy is not None:
            out["entropy"] = t.entropy
        return out


def policy_loss(
    objective: str,
    t: Terms,
    clip: float = 0.2,
    dual_clip: float = 3.0,
    tokens: torch.Tensor | float | None = None,
    residual_clamp: float = 10.0,
    grpo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token mean of ``objective``'s per-position loss; with ``grpo`` = (advantage per response,
    OPD positions, GRPO positions) the hybrid of issue 24 with that objective as its OPD term. Stats are
    sums over the valid positions / ``tokens`` (so they add up over micro-batches and ranks)."""
    if objective not in OBJECTIVE_FNS:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    opd_token, per_pos = OBJECTIVE_FNS[objective](t, clip, dual_clip, residual_clamp)
    diag = diagnostics(t)
    if grpo is None:
        loss, m, n = _token_mean(opd_token, t.mask, tokens)
        with torch.no_grad():
            stats = {k_: (v.to(m.dtype) * m).sum() / n for k_, v in (per_pos | diag).items()}
        return loss, stats
    grpo_adv, opd_on, grpo_on = grpo
    a_y = grpo_adv.detach()[:, None].expand_as(t.logp_y)
    grpo_token, g1, g2 = _ppo_clipped(a_y, _ratio(t.logp_y, t.old_y), clip, dual_clip)
    zero = torch.zeros_like(opd_token)
    per_token = torch.where(opd_on, opd_token, zero) + torch.where(grpo_on, grpo_token, zero)
    per_token = torch.where(opd_on & ~grpo_on, opd_token, per_token)
    loss, m, n = _token_mean(per_token, t.mask, tokens)
    with torch.no_grad():
        om, gm = (opd_on & t.mask).to(m.dtype), (grpo_on & t.mask).to(m.dtype)
        stats = {k_: (v.to(m.dtype) * om).sum() / n for k_, v in per_pos.items()}
        stats |= {k_: (v.to(m.dtype) * m).sum() / n for k_, v in diag.items()}
        stats |= {
            "grpo_clip_frac": ((g2 > g1).to(m.dtype) * gm).sum() / n,
            "grpo_tokens": gm.sum(),
            "grpo_advantage": (a_y * gm).sum() / n,
        }
    return loss, stats
