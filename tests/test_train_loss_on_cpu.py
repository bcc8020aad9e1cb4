"""The OPD loss against an independent per-candidate computation (padding, L scaling, clipping)."""

import math

import torch

from opdcache.train.loss import opd_policy_loss


def _reference(logp, old, teach, weight, mask, clip=0.2, c=3.0):
    b, t, k = logp.shape
    logp, old, teach, weight, mask = (x.tolist() for x in (logp, old, teach, weight, mask))
    total, n = 0.0, 0
    for i in range(b):
        for tau in range(t):
            if not mask[i][tau]:
                continue
            n += 1
            z = sum(math.exp(old[i][tau][j]) for j in range(k))
            for j in range(k):
                w = math.exp(old[i][tau][j]) / z
                a = weight[i][tau] * (-w * (old[i][tau][j] - teach[i][tau][j]))
                rho = math.exp(logp[i][tau][j] - old[i][tau][j])
                loss = max(-a * rho, -a * min(max(rho, 1 - clip), 1 + clip))
                if a < 0:
                    loss = min(loss, -a * c)
                total += loss
    return total / n


def _case(seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    b, t, k = 3, 5, 4
    old = torch.log_softmax(torch.randn(b, t, 16, generator=g), -1)[..., :k].double()
    logp = old + spread * torch.randn(b, t, k, generator=g, dtype=torch.float64)
    teach = old + torch.randn(b, t, k, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    weight = (torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5) * mask
    return logp, old, teach, weight, mask


def test_loss_matches_per_candidate_reference():
    for seed in range(5):
        for spread in (0.01, 1.0, 3.0):  # inside the clip range, and far outside it (clipping, dual clip)
            args = _case(seed, spread)
            loss, stats = opd_policy_loss(*args)
            assert math.isclose(loss.item(), _reference(*args), rel_tol=1e-9, abs_tol=1e-12)
            if spread == 3.0:
                assert stats["clip_frac"] > 0


def test_padding_and_weight_scaling():
    logp, old, teach, weight, mask = _case(0)
    base, _ = opd_policy_loss(logp, old, teach, weight, mask)
    garbage = logp.clone()
    garbage[~mask] = 100.0  # padding positions must not matter
    assert torch.allclose(opd_policy_loss(garbage, old, teach, weight, mask)[0], base)
    # with ratio inside the clip range the loss is linear in L: doubling L doubles it
    near = old + 1e-3
    l1, _ = opd_policy_loss(near, old, teach, weight, mask)
    l2, _ = opd_policy_loss(near, old, teach, 2 * weight, mask)
    assert torch.allclose(l2, 2 * l1)


def test_gradient_moves_student_toward_teacher():
    old = torch.log_softmax(torch.tensor([[[2.0, 1.0, 0.0]]]), -1)
    teach = torch.log_softmax(torch.tensor([[[0.0, 1.0, 2.0]]]), -1)
    logits = torch.tensor([[[2.0, 1.0, 0.0]]], requires_grad=True)
    loss, _ = opd_policy_loss(
        torch.log_softmax(logits, -1), old, teach, torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)
    )
    loss.backward()
    assert logits.grad[0, 0, 2] < 0 < logits.grad[0, 0, 0]  # descent raises the teacher-preferred id


def test_log_ratio_is_clamped_before_exp():
    """One wild token (log ratio 800) must not make the loss inf: the reference clamps to [-20, 20]."""
    logp, old, teach, weight, mask = _case(3)
    logp = logp.clone()
    logp[0, 0, 0] = old[0, 0, 0] + 800.0  # exp(800) overflows even in float64
    logp[0, 1, 1] = old[0, 1, 1] - 800.0
    loss, _ = opd_policy_loss(logp, old, teach, weight, mask)
    assert torch.isfinite(loss)
    clamped = old + (logp - old).clamp(-20.0, 20.0)
    assert math.isclose(loss.item(), _reference(clamped, old, teach, weight, mask), rel_tol=1e-9)


def test_tokens_sets_the_token_mean_denominator():
    logp, old, teach, weight, mask = _case(4)
    loss, _ = opd_policy_loss(logp, old, teach, weight, mask)
    half, _ = opd_policy_loss(logp, old, teach, weight, mask, tokens=2 * mask.sum())
    assert math.isclose(half.item(), loss.item() / 2, rel_tol=1e-12)
