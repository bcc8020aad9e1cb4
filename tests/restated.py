"""Expected values restated independently of the package, shared by several tests."""


def alg1_step(m, low, e, b):
    """Algorithm 1 lines 12-19 written out: budget ``m`` and low-hit count ``low`` after a round whose
    effective lengths are ``e``; ``b`` holds min, max, step, margin, rho and patience."""
    hit = sum(x >= max(b["min"], m - b["margin"]) for x in e) / len(e)
    if hit >= b["rho"]:
        return min(m + b["step"], b["max"]), 0
    if low + 1 >= b["patience"]:
        return max(m - b["step"], b["min"]), 0
    return m, low + 1


def _ppo(adv, logp, old, clip, dual_clip):
    import torch

    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip))
    return torch.where(adv < 0, torch.minimum(clipped, -adv * dual_clip), clipped)


def _token_mean(per_token, mask, tokens):
    import torch

    m = mask.to(per_token.dtype)
    n = (
        m.sum().clamp(min=1.0)
        if tokens is None
        else torch.as_tensor(tokens, dtype=per_token.dtype).clamp(min=1.0)
    )
    return (per_token * m).sum() / n


def released_opd_loss(logp, student_old, teacher, weight, mask, clip=0.2, dual_clip=3.0, tokens=None):
    """The OPD loss as opdcache computed it before train.objective existed (commit 22036a6, the paper's
    released code), kept verbatim so that ``student-topk`` can be held to it bit for bit."""
    import torch

    w = torch.softmax(student_old, dim=-1)
    adv = (-w * (student_old - teacher) * weight.unsqueeze(-1)).detach()
    per_token = _ppo(adv, logp, student_old, clip, dual_clip).sum(-1)
    return _token_mean(per_token, mask, tokens)


def released_hybrid_loss(
    logp,
    old,
    teacher,
    weight,
    mask,
    logp_y,
    old_y,
    grpo_adv,
    opd_on,
    grpo_on,
    clip=0.2,
    dual_clip=3.0,
    tokens=None,
):
    """The gated / summed OPD + GRPO loss as opdcache computed it before train.objective (commit 22036a6),
    written out with the same operations."""
    import torch

    w = torch.softmax(old, dim=-1)
    adv = (-w * (old - teacher) * weight.unsqueeze(-1)).detach()
    opd_token = _ppo(adv, logp, old, clip, dual_clip).sum(-1)
    a_y = grpo_adv.detach()[:, None].expand_as(logp_y)
    grpo_token = _ppo(a_y, logp_y, old_y, clip, dual_clip)
    zero = torch.zeros_like(opd_token)
    per_token = torch.where(opd_on, opd_token, zero) + torch.where(grpo_on, grpo_token, zero)
    per_token = torch.where(opd_on & ~grpo_on, opd_token, per_token)
    return _token_mean(per_token, mask, tokens)
