"""The OPD objectives of train.objective (issue 30) against restatements over the full vocabulary.

Each case is a small vocabulary with full student logits (the leaf the gradient is taken on) and a full
teacher distribution; the cached quantities (both top-k sets, q on them, q(y)) are cut from those, as
the rollout and the teacher stage cut them, and ``forward_terms`` builds the objectives' inputs from
the logits, as the trainer does."""

import math

import pytest
import torch

from opdcache.train.loss import policy_loss
from opdcache.train.stage import forward_terms, sequence_logprobs
from tests.restated import released_hybrid_loss, released_opd_loss

V, K = 24, 4


class _Logits(torch.nn.Module):
    """A "model" whose logits at every input position are a given leaf tensor."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits})()


def _case(seed, b=2, t=5, temp=1.0):
    """(logits leaf [b, t, V], teacher log q [b, t, V], collated batch). Prompt length 1: position tau's
    logits sit at input position tau (``positions`` = tau)."""
    g = torch.Generator().manual_seed(seed)
    logits = (temp * torch.randn(b, t, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    q = torch.log_softmax(logits.detach() + 1.5 * torch.randn(b, t, V, generator=g, dtype=torch.float64), -1)
    lp = torch.log_softmax(logits.detach(), -1)
    s_ids = lp.topk(K, -1).indices
    t_ids = q.topk(K, -1).indices
    y = torch.multinomial(lp.exp().reshape(-1, V), 1, generator=g).reshape(b, t)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False
    batch = {
        "input_ids": torch.zeros(b, t, dtype=torch.long),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "positions": torch.arange(t).expand(b, t),
        "mask": mask,
        "topk_ids": s_ids,
        "old": lp.gather(2, s_ids),  # the trainer's recompute: ratio 1
        "teacher": q.gather(2, s_ids),
        "weight": (torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5) * mask,
        "response_ids": y,
        "old_y": lp.gather(2, y[..., None])[..., 0],
        "teacher_ids": t_ids,
        "teacher_topk": q.gather(2, t_ids),
        "teacher_y": q.gather(2, y[..., None])[..., 0],
    }
    return logits, q, batch


def _loss(objective, logits, batch, **kw):
    return policy_loss(objective, forward_terms(_Logits(logits), batch), **kw)


def _grad(loss, logits):
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    return g


def _full_kl(logits, q, batch):
    """sum_V p (log p - log q) x L, token mean: the full reverse KL."""
    lp = torch.log_softmax(logits, -1)
    kl = (lp.exp() * (lp - q)).sum(-1) * batch["weight"]
    m = batch["mask"].to(kl.dtype)
    return (kl * m).sum() / m.sum()


def _bucket_restated(logits, q, batch):
    """The KL of p and q coarse-grained to U = both top-k sets + one bucket, written out per position."""
    lp = torch.log_softmax(logits, -1)
    total, n = 0.0, 0
    b, t = batch["mask"].shape
    for i in range(b):
        for tau in range(t):
            if not batch["mask"][i, tau]:
                continue
            n += 1
            u = set(batch["topk_ids"][i, tau].tolist()) | set(batch["teacher_ids"][i, tau].tolist())
            p, qq = lp[i, tau].exp(), q[i, tau].exp()
            kl = sum(p[v] * (lp[i, tau, v] - q[i, tau, v]) for v in u)
            rest = [v for v in range(V) if v not in u]
            p_r, q_r = sum(p[v] for v in rest), sum(qq[v] for v in rest)
            total = total + batch["weight"][i, tau] * (kl + p_r * torch.log(p_r / q_r))
    return total / n


def test_student_topk_is_the_released_loss_bit_for_bit():
    for seed in range(4):
        for spread in (0.0, 0.01, 2.0):  # ratio 1, inside the clip range, far outside (clip, dual clip)
            logits, q, batch = _case(seed)
            terms = forward_terms(_Logits(logits), batch)
            g = torch.Generator().manual_seed(100 + seed)
            logp = terms.logp + spread * torch.randn(terms.logp.shape, generator=g, dtype=torch.float64)
            terms.logp = logp
            got, _ = policy_loss("student-topk", terms)
            want = released_opd_loss(logp, batch["old"], batch["teacher"], batch["weight"], batch["mask"])
            assert torch.equal(got, want)
            assert torch.equal(_grad(got, logits), _grad(want, logits))
    # the trainer's forward gives the released code's log-probs (sequence_logprobs, unchanged) exactly
    logits, q, batch = _case(0)
    assert torch.equal(forward_terms(_Logits(logits), batch).logp, sequence_logprobs(_Logits(logits), batch))


@pytest.mark.parametrize("masks", ["gated", "sum", "grpo"])
def test_the_hybrid_with_student_topk_is_the_released_hybrid_bit_for_bit(masks):
    logits, q, batch = _case(6)
    terms = forward_terms(_Logits(logits), batch)
    g = torch.Generator().manual_seed(3)
    terms.logp = terms.logp + 0.5 * torch.randn(terms.logp.shape, generator=g, dtype=torch.float64)
    terms.logp_y = terms.logp_y + 0.5 * torch.randn(terms.logp_y.shape, generator=g, dtype=torch.float64)
    reliable = torch.rand(batch["mask"].shape, generator=g) > 0.4
    none = torch.zeros_like(reliable)
    opd_on, grpo_on = {
        "gated": (reliable, ~reliable),
        "sum": (batch["mask"], batch["mask"]),
        "grpo": (none, batch["mask"]),
    }[masks]
    adv = torch.tensor([1.3, -0.7], dtype=torch.float64)
    got, _ = policy_loss("student-topk", terms, grpo=(adv, opd_on & batch["mask"], grpo_on & batch["mask"]))
    want = released_hybrid_loss(
        terms.logp, batch["old"], batch["teacher"], batch["weight"], batch["mask"], terms.logp_y,
        batch["old_y"], adv, opd_on & batch["mask"], grpo_on & batch["mask"],
    )  # fmt: skip
    assert torch.equal(got, want)
    assert torch.equal(_grad(got, logits), _grad(want, logits))


def test_bucket_is_the_coarse_grained_kl_and_its_gradient():
    for seed in range(3):
        logits, q, batch = _case(seed)
        got, stats = _loss("bucket", logits, batch)
        want = _bucket_restated(logits, q, batch)
        # the trainer's log-softmax is fp32 (as the reference's): agreement to fp32 rounding
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(_grad(got, logits), _grad(want, logits), rtol=1e-5, atol=1e-7)
        # a coarse-graining of the full KL: 0 <= bucket <= full (data-processing inequality)
        assert 0 <= got.item() <= _full_kl(logits, q, batch).item()


def test_bucket_pushes_mass_from_the_rest_to_the_teachers_ids():
    """The failure of student-topk (issue 30): with the student's mass spread over its tail and the
    teacher's on ids outside the student's top-k, the bucket's step moves mass to those ids."""
    logits, q, batch = _case(0)
    g = _grad(_loss("bucket", logits, batch)[0], logits)
    lp = torch.log_softmax(logits.detach(), -1)
    i, tau = 0, 0
    new = [v for v in batch["teacher_ids"][i, tau].tolist() if v not in batch["topk_ids"][i, tau].tolist()]
    preferred = [v for v in new if q[i, tau, v] > lp[i, tau, v] + 1.0]
    assert preferred  # the case has such ids
    for v in preferred:  # an id the teacher prefers far more than the student rises (descent: -grad > 0)
        assert g[i, tau, v] < 0


@pytest.mark.parametrize("objective", ["sum-and-sample", "sampled-token"])
def test_expected_gradient_over_the_sampled_token_is_the_full_reverse_kl_gradient(objective):
    """Averaged over every y weighted by p(y) (ratio 1, as at a round's first step), the gradient is
    sum_V p_v d_v grad log p_v x L: the full reverse KL's. sum-and-sample adds its residual only for y
    in R; sampled-token is the plain score-function estimator."""
    for seed in range(3):
        logits, q, batch = _case(seed, temp=2.0)
        want = _grad(_full_kl(logits, q, batch), logits)
        lp = torch.log_softmax(logits.detach(), -1)
        expected = torch.zeros_like(logits)
        for a in range(V):
            yb = dict(batch)
            y = torch.full_like(batch["response_ids"], a)
            yb |= {
                "response_ids": y,
                "old_y": lp.gather(2, y[..., None])[..., 0],
                "teacher_y": q.gather(2, y[..., None])[..., 0],
            }
            g = _grad(_loss(objective, logits, yb, residual_clamp=1e6)[0], logits)
            expected += lp[..., a].exp()[..., None] * g  # each position's gradient is its own row
        torch.testing.assert_close(expected, want, rtol=0, atol=1e-5)
        assert (expected - want).abs().max() < 1e-7  # exact up to the trainer's fp32 log-softmax


def test_sum_and_sample_residual_fires_only_in_the_rest_and_is_clamped():
    logits, q, batch = _case(1, temp=2.0)
    terms = forward_terms(_Logits(logits), batch)
    bucket, _ = policy_loss("bucket", terms)
    both, stats = policy_loss("sum-and-sample", terms, residual_clamp=1e6)
    in_rest = terms.y_in_rest & batch["mask"]
    assert in_rest.any() and (~in_rest & batch["mask"]).any()
    # the residual's value at ratio 1 is -A = L (d_y - l_R) where y is in R
    lp = torch.log_softmax(logits.detach(), -1)
    in_u = _in_u(batch)
    ell = torch.log((lp.exp() * (1 - in_u)).sum(-1)) - torch.log(1 - (q.exp() * in_u).sum(-1))
    d_y = lp.gather(2, batch["response_ids"][..., None])[..., 0] - batch["teacher_y"]
    resid = torch.where(in_rest, batch["weight"] * (d_y - ell), 0.0)
    assert both.item() == pytest.approx(bucket.item() + (resid.sum() / batch["mask"].sum()).item(), rel=1e-6)
    _, clamped = policy_loss("sum-and-sample", terms, residual_clamp=1e-3)
    assert clamped["residual_clamp_frac"].item() == pytest.approx(
        in_rest.sum().item() / batch["mask"].sum().item()
    )
    assert stats["residual_clamp_frac"].item() == 0


def _in_u(batch):
    u = torch.zeros(*batch["mask"].shape, V, dtype=torch.float64)
    return u.scatter(2, batch["topk_ids"], 1.0).scatter(2, batch["teacher_ids"], 1.0)


def test_sampled_token_is_a_ppo_clipped_advantage_on_the_sampled_token():
    logits, q, batch = _case(2)
    terms = forward_terms(_Logits(logits), batch)
    g = torch.Generator().manual_seed(7)
    terms.logp_y = terms.logp_y + 2.0 * torch.randn(terms.logp_y.shape, generator=g, dtype=torch.float64)
    got, stats = policy_loss("sampled-token", terms)
    total, n = 0.0, 0
    for i in range(2):
        for tau in range(5):
            if not batch["mask"][i, tau]:
                continue
            n += 1
            a = -float(batch["weight"][i, tau]) * float(batch["old_y"][i, tau] - batch["teacher_y"][i, tau])
            rho = math.exp(max(-20.0, min(20.0, float(terms.logp_y[i, tau] - batch["old_y"][i, tau]))))
            loss = max(-a * rho, -a * min(max(rho, 0.8), 1.2))
            total += min(loss, -a * 3.0) if a < 0 else loss
    assert got.item() == pytest.approx(total / n, rel=1e-10)
    assert stats["clip_frac"] > 0


def test_diagnostics_against_the_full_softmax():
    logits, q, batch = _case(3)
    _, stats = _loss("student-topk", logits, batch)
    lp = torch.log_softmax(logits.detach(), -1)
    m = batch["mask"].to(torch.float64)
    mean = lambda x: ((x * m).sum() / m.sum()).item()  # noqa: E731
    in_u = _in_u(batch)
    p_r = (lp.exp() * (1 - in_u)).sum(-1)
    q_r = (q.exp() * (1 - in_u)).sum(-1)
    assert stats["student_topk_mass"].item() == pytest.approx(
        mean(lp.exp().gather(2, batch["topk_ids"]).sum(-1))
    )
    assert stats["rest_mass"].item() == pytest.approx(mean(p_r))
    assert stats["teacher_rest_mass"].item() == pytest.approx(mean(q_r))
    assert stats["rest_log_ratio"].item() == pytest.approx(mean(torch.log(p_r / q_r)))
    assert stats["entropy"].item() == pytest.approx(mean(-(lp.exp() * lp).sum(-1)))
    y_in_r = 1 - in_u.gather(2, batch["response_ids"][..., None])[..., 0]
    assert stats["sampled_in_rest"].item() == pytest.approx(mean(y_in_r))


@pytest.mark.parametrize("objective", ["student-topk", "bucket", "sum-and-sample", "sampled-token"])
def test_the_hybrid_with_only_opd_positions_is_the_objective_exactly(objective):
    logits, q, batch = _case(4)
    terms = forward_terms(_Logits(logits), batch)
    want, _ = policy_loss(objective, terms)
    none = torch.zeros_like(batch["mask"])
    got, _ = policy_loss(
        objective, terms, grpo=(torch.tensor([1.0, -1.0], dtype=torch.float64), batch["mask"], none)
    )
    assert torch.equal(got, want)


def test_an_unknown_objective_is_refused():
    logits, q, batch = _case(0)
    with pytest.raises(ValueError, match="unknown objective 'kl'"):
        _loss("kl", logits, batch)


def test_rollouts_at_another_temperature_are_importance_weighted():
    """Rollouts drawn at T = 0.6 (the toy demo's): with the old pass's weight p(y) / p_T(y), the
    expectation over y ~ p_T of sum-and-sample's gradient is still the full reverse KL's."""
    temp = 0.6
    logits, q, batch = _case(5, temp=2.0)
    want = _grad(_full_kl(logits, q, batch), logits)
    lp = torch.log_softmax(logits.detach(), -1)
    p_temp = torch.softmax(logits.detach() / temp, -1)
    expected, unweighted = torch.zeros_like(logits), torch.zeros_like(logits)
    for a in range(V):
        y = torch.full_like(batch["response_ids"], a)
        yb = batch | {
            "response_ids": y,
            "old_y": lp.gather(2, y[..., None])[..., 0],
            "teacher_y": q.gather(2, y[..., None])[..., 0],
        }
        w = forward_terms(_Logits(logits), yb, temperature=temp).sampler_weight  # the old pass's
        torch.testing.assert_close(
            w.double(), (lp[..., a] - torch.log(p_temp[..., a])).exp(), rtol=1e-5, atol=0
        )
        g = _grad(_loss("sum-and-sample", logits, yb | {"sampler_weight": w}, residual_clamp=1e6)[0], logits)
        g0 = _grad(_loss("sum-and-sample", logits, yb, residual_clamp=1e6)[0], logits)
        expected += p_temp[..., a][..., None] * g
        unweighted += p_temp[..., a][..., None] * g0
    torch.testing.assert_close(expected, want, rtol=0, atol=1e-5)
    assert (unweighted - want).abs().max() > 1e-3  # without the weight it is biased


def test_padding_as_collate_writes_it_changes_nothing():
    """Padded positions hold id 0 everywhere and zeros for the cached values (collate's padding): the
    loss and its gradient equal those of the valid positions alone, for every objective."""
    logits, q, batch = _case(7)
    pad = ~batch["mask"]
    padded = dict(batch)
    for key in ("topk_ids", "teacher_ids", "old", "teacher", "teacher_topk"):
        padded[key] = batch[key].masked_fill(pad[..., None], 0)
    for key in ("response_ids", "old_y", "teacher_y"):
        padded[key] = batch[key].masked_fill(pad, 0)
    for objective in ("student-topk", "bucket", "sum-and-sample", "sampled-token"):
        got, stats = _loss(objective, logits, padded)
        want, _ = _loss(objective, logits, batch)
        assert torch.isfinite(got) and all(torch.isfinite(v) for v in stats.values())
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(_grad(got, logits), _grad(want, logits), rtol=1e-5, atol=1e-7)
