"""GRPO's outcome advantage and the gated OPD / GRPO loss (issue 24), against restatements in the test."""

import math

import numpy as np
import pytest
import torch

from opdcache.score.reliability import grpo_advantages
from opdcache.train.loss import hybrid_policy_loss, opd_policy_loss


def _adv_restated(outcome, groups, std_norm=True, eps=1e-6):
    out, flat = [], []
    for o, g in zip(outcome, groups, strict=True):
        vals = [x for x, h in zip(outcome, groups, strict=True) if h == g]
        if len(vals) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        out.append((o - mean) / (std + eps) if std_norm else o - mean)
        flat.append(len(vals) > 1 and len(set(vals)) == 1)
    return np.array(out), np.array(flat)


@pytest.mark.parametrize("std_norm", [True, False])
def test_grpo_advantage_restated(std_norm):
    outcome = [1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    groups = (
        ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4 + ["e"]
    )  # mixed, all 1, all 0, one right, one alone
    adv, flat = grpo_advantages(np.array(outcome, float), np.array(groups), std_norm=std_norm)
    want, want_flat = _adv_restated(outcome, groups, std_norm)
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-7)
    assert (flat == want_flat).all() and flat.sum() == 8  # groups b and c
    assert (adv[4:12] == 0).all()  # all-equal groups give exactly 0
    # a mixed group of 4 with 2 right: mean 0.5, unbiased std sqrt(1/3)
    assert adv[0] == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-6) if std_norm else 0.5, rel=1e-6)
    assert adv[16] == pytest.approx(1 / (1 + 1e-6) if std_norm else 1.0)  # verl: a group of one


def _case(seed, b=3, t=6, k=4, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    old = torch.log_softmax(torch.randn(b, t, 16, generator=g), -1)[..., :k].double()
    logp = old + spread * torch.randn(b, t, k, generator=g, dtype=torch.float64)
    teach = old + torch.randn(b, t, k, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * t, [1] * (t - 2) + [0] * 2, [1] + [0] * (t - 1)], dtype=torch.bool)
    weight = (torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5) * mask
    old_y = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp_y = old_y + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    return logp, old, teach, weight, mask, logp_y, old_y, adv


def test_with_r_positive_everywhere_it_is_the_opd_loss_exactly():
    for seed in range(4):
        logp, old, teach, weight, mask, logp_y, old_y, adv = _case(seed, spread=2.0)
        want, _ = opd_policy_loss(logp, old, teach, weight, mask)
        none = torch.zeros_like(mask)
        got, _ = hybrid_policy_loss(logp, old, teach, weight, mask, logp_y, old_y, adv, mask, none)
        assert torch.equal(got, want)


def _grpo_restated(logp_y, old_y, adv, mask, clip=0.2, c=3.0):
    total, n = 0.0, 0
    for i in range(mask.shape[0]):
        for tau in range(mask.shape[1]):
            if not mask[i, tau]:
                continue
            n += 1
            a = float(adv[i])
            rho = math.exp(max(-20.0, min(20.0, float(logp_y[i, tau] - old_y[i, tau]))))
            loss = max(-a * rho, -a * min(max(rho, 1 - clip), 1 + clip))
            total += min(loss, -a * c) if a < 0 else loss
    return total / n


def test_with_r_zero_everywhere_it_is_a_grpo_ppo_clip_loss():
    for seed in range(4):
        for spread in (0.01, 2.0):  # inside the clip range and far outside (clip, dual clip)
            logp, old, teach, weight, mask, logp_y, old_y, adv = _case(seed, spread=spread)
            none = torch.zeros_like(mask)
            got, stats = hybrid_policy_loss(logp, old, teach, weight, mask, logp_y, old_y, adv, none, mask)
            assert got.item() == pytest.approx(_grpo_restated(logp_y, old_y, adv, mask), rel=1e-12, abs=1e-15)
            assert stats["grpo_tokens"] == mask.sum() and stats["reward"] == 0


def test_each_position_takes_its_gradient_from_the_right_term(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models / "student", dtype=torch.float64)
    k, b, t = 4, 2, 7
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 20, (b, t + 1), generator=g)
    logits = model(input_ids=ids).logits[:, :t].detach().requires_grad_(True)
    topk = torch.log_softmax(logits, -1).topk(k, -1).indices.detach()
    y = ids[:, 1:]
    mask = torch.ones(b, t, dtype=torch.bool)
    reliable = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # R > 0
    with torch.no_grad():
        lp0 = torch.log_softmax(logits, -1)
        old, old_y = lp0.gather(2, topk) - 0.05, lp0.gather(2, y[..., None])[..., 0] + 0.1  # ratios != 1
    teach = old + torch.randn(b, t, k, generator=g, dtype=torch.float64)
    weight = torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5
    adv = torch.tensor([0.8, -1.2], dtype=torch.float64)

    def grad(opd_on, grpo_on):
        if logits.grad is not None:
            logits.grad = None
        lp = torch.log_softmax(logits, -1)
        loss, _ = hybrid_policy_loss(
            lp.gather(2, topk), old, teach, weight, mask, lp.gather(2, y[..., None])[..., 0], old_y, adv,
            opd_on, grpo_on, tokens=float(mask.sum()),
        )  # fmt: skip
        loss.backward()
        return logits.grad.clone()

    gated = grad(reliable, ~reliable)
    only_opd = grad(reliable, torch.zeros_like(mask))  # the OPD term on the reliable prefix only
    only_grpo = grad(torch.zeros_like(mask), ~reliable)
    for i in range(b):
        for tau in range(t):
            want = only_opd[i, tau] if reliable[i, tau] else only_grpo[i, tau]
            other = only_grpo[i, tau] if reliable[i, tau] else only_opd[i, tau]
            assert torch.equal(other, torch.zeros_like(other))
            torch.testing.assert_close(gated[i, tau], want, rtol=0, atol=1e-15)
            assert want.abs().max() > 0


class _Texts:
    """A stand-in tokenizer: response [i] decodes to TEXTS[i]."""

    def batch_decode(self, seqs, skip_special_tokens=True):
        assert skip_special_tokens  # what vLLM's text holds, and the eval grades
        return [TEXTS[s[0]] for s in seqs]


TEXTS = [
    "so \\boxed{83}",
    "\\boxed{84}",
    "83, no box",
    "\\boxed{8\\boxed{3}}",
    "\\boxed{12}",
    "\\boxed{ 12 }",
]


@pytest.mark.parametrize("checker", ["exact", "math"])
def test_outcome_rewards_grade_the_decoded_text(checker):
    import pyarrow as pa

    from opdcache.score.stage import outcome_rewards
    from opdcache.variant import VariantSpec

    # prompt a (gold 83): right, wrong, no box, a nested box (the grader reads the last, "3");
    # prompt b (gold 12): both right (a zero-variance group)
    table = pa.table({
        "prompt_id": ["a", "a", "a", "a", "b", "b"],
        "response_ids": pa.array([[i] for i in range(6)], pa.list_(pa.int32())),
    })  # fmt: skip
    spec = VariantSpec(outcome=checker)
    o, adv, zero = outcome_rewards(table, {"a": "83", "b": "12"}, spec, _Texts(), "part")
    assert o.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    want, want_zero = _adv_restated(o.tolist(), list("aaaabb"))
    np.testing.assert_allclose(adv, want, rtol=1e-6)
    assert zero.tolist() == want_zero.tolist() == [False] * 4 + [True] * 2
    with pytest.raises(Exception, match="no gold answer for prompt"):
        outcome_rewards(table, {"a": "83"}, spec, _Texts(), "part")
