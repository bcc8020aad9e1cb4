"""OPD steps on a tiny model with a fixed teacher lower the reverse KL on held-out prefixes."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from opdcache.models.tiny import build_tiny_model
from opdcache.train.data import Example, collate
from opdcache.train.loss import opd_policy_loss
from opdcache.train.stage import sequence_logprobs

K = 8


def _topk_reverse_kl(student, teacher, prefixes):
    """Mean over positions of KL(p || q) on the student's top-k support (both renormalised there)."""
    with torch.no_grad():
        lp = torch.log_softmax(student(prefixes).logits.float(), -1)
        lq = torch.log_softmax(teacher(prefixes).logits.float(), -1)
    ids = lp.topk(K, -1).indices
    p = torch.log_softmax(lp.gather(-1, ids), -1)
    q = torch.log_softmax(lq.gather(-1, ids), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def _rollout(student, teacher, prompts, steps):
    with torch.no_grad():
        seq = student.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            top_k=0,
            max_new_tokens=steps,
            min_new_tokens=steps,
            pad_token_id=1,
        )
        p = prompts.shape[1]
        lp = torch.log_softmax(student(seq).logits.float(), -1)[:, p - 1 : -1]
        lq = torch.log_softmax(teacher(seq).logits.float(), -1)[:, p - 1 : -1]
    top = lp.topk(K, -1)
    out = []
    for i in range(len(seq)):
        out.append(
            Example(
                prompts[i].numpy(),
                seq[i, p:].numpy(),
                top.indices[i].numpy(),
                top.values[i].numpy(),
                lq[i].gather(-1, top.indices[i]).numpy(),
                np.ones(steps, np.float32),
            )
        )
    return out


def test_opd_lowers_reverse_kl_to_fixed_teacher(tmp_path):
    # a spread-out student (top-1 ~0.35) and a confident teacher of another seed (top-1 ~0.98)
    build_tiny_model(tmp_path / "s", seed=1, embedding_scale=2.0)
    build_tiny_model(tmp_path / "t", seed=2, embedding_scale=4.0)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "t", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    held_out = torch.randint(3, 60, (8, 24), generator=g)
    before = _topk_reverse_kl(student, teacher, held_out)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for _ in range(6):  # rounds: sample on-policy, then a few OPD steps on the cached batch
        prompts = torch.randint(3, 60, (8, 6), generator=g)
        batch = collate(_rollout(student, teacher, prompts, 16), pad_id=1)
        for _ in range(4):
            loss, _ = opd_policy_loss(
                sequence_logprobs(student, batch),
                batch["old"],
                batch["teacher"],
                batch["weight"],
                batch["mask"],
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = _topk_reverse_kl(student, teacher, held_out)
    print(f"top-k reverse KL on held-out prefixes: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)
