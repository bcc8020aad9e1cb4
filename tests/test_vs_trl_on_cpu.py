"""opdcache's OPD loss and TRL's DistillationTrainer (beta = 1) on the same logits (issue 41).

On one fixed batch of on-policy samples from a tiny student, both are the full-vocabulary reverse KL,
averaged over the completions' valid positions (token mean):

    D = (1 / N) sum_{tau valid} sum_{v in V} p(v | s_tau) (log p(v | s_tau) - log q(v | s_tau))

p the student's softmax, q the teacher's, both at temperature 1; N the valid positions.

- TRL 1.16 (``DistillationTrainer._compute_loss``, beta = 1): the chunked generalized JSD of the student's
  and the teacher's last hidden states through their ``lm_head``s, reverse KL(p || q) per position,
  summed over the completion mask and divided by its count.
- opdcache (``forward_terms`` + ``policy_loss``): ``bucket`` is sum_{v in U} p_v d_v + P_R l_R with U the
  student's and the teacher's cached top-k ids; with k = V (the cache holds the whole vocabulary) U = V,
  P_R = 0 and the bucket is D. ``sum-and-sample`` adds the sampled token's residual only where y lies
  outside U, so with k = V it is D too; its gradient is then the full reverse-KL gradient.

The test restates D naively (one unpadded forward per sequence, log_softmax, the sum above) and asserts
all three values and the two trainers' gradients agree to fp32 tolerance, with ragged prompts (TRL
left-pads them, opdcache right-pads) and ragged completions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from opdcache.toy.models import build_toy_tokenizer  # noqa: E402
from opdcache.train.data import Example, collate  # noqa: E402
from opdcache.train.loss import policy_loss  # noqa: E402
from opdcache.train.stage import forward_terms  # noqa: E402

B, P, T = 4, 6, 10  # sequences, prompt tokens (the first prompt SHORT fewer), new tokens
SHORT = 2


def tiny(vocab: int, layers: int, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen3ForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = build_toy_tokenizer(tmp_path_factory.mktemp("tok"))
    v = len(tok)
    student, teacher = tiny(v, 2, 0), tiny(v, 3, 1)
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(2, v, (B, P), generator=gen)
    torch.manual_seed(3)
    with torch.no_grad():
        out = student.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=T,
            min_new_tokens=T, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    completions = out[:, P:]
    lengths = torch.tensor([T, T - 3, T - 1, 4])  # ragged completions: the mask must matter
    return tok, student, teacher, prompts, completions, lengths


def prompt_of(prompts: torch.Tensor, b: int) -> torch.Tensor:
    """Ragged prompts: the first is SHORT tokens shorter (TRL left-pads it, opdcache right-pads)."""
    return prompts[b, SHORT:] if b == 0 else prompts[b]


def naive_reverse_kl(student, teacher, prompts, completions, lengths) -> torch.Tensor:
    """D above: each sequence alone (no padding), the positions that predict its completion."""
    total, n = torch.zeros(()), 0
    for b in range(len(prompts)):
        p = len(prompt_of(prompts, b))
        ids = torch.cat([prompt_of(prompts, b), completions[b, : lengths[b]]])[None]
        sl = torch.log_softmax(student(ids).logits[0].float(), -1)
        tl = torch.log_softmax(teacher(ids).logits[0].float(), -1)
        sl, tl = sl[p - 1 : p - 1 + lengths[b]], tl[p - 1 : p - 1 + lengths[b]]
        total = total + (sl.exp() * (sl - tl)).sum()
        n += int(lengths[b])
    return total / n


def trl_loss(tok, student, teacher, prompts, completions, lengths, tmp_path) -> torch.Tensor:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=str(tmp_path / "trl"), beta=1.0, temperature=1.0, bf16=False,
        gradient_checkpointing=False, report_to=[], per_device_train_batch_size=B, use_cpu=True,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=Dataset.from_list([{"prompt": "1 + 1"}]), processing_class=tok,
    )  # fmt: skip
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    pmask = torch.ones_like(prompts)
    pmask[0, :SHORT] = 0  # TRL's layout: prompts left-padded, completions right-padded
    inputs = {
        "prompt_ids": torch.where(pmask.bool(), prompts, tok.pad_token_id),
        "prompt_mask": pmask,
        "completion_ids": torch.where(mask.bool(), completions, tok.pad_token_id),
        "completion_mask": mask,
    }
    student.train(False)
    loss, _, n_valid = trainer._compute_loss(trainer.accelerator.unwrap_model(trainer.model), inputs, None)
    assert int(n_valid) == int(lengths.sum())
    return loss


def opdcache_examples(student, teacher, prompts, completions, lengths) -> list[Example]:
    """The cache the rollout and teacher stages would write at k = V: every id, ranked by each model."""
    out = []
    with torch.no_grad():
        for b in range(len(prompts)):
            t, p = int(lengths[b]), len(prompt_of(prompts, b))
            ids = torch.cat([prompt_of(prompts, b), completions[b, :t]])[None]
            sl = torch.log_softmax(student(ids).logits[0].float(), -1)[p - 1 : p - 1 + t]
            tl = torch.log_softmax(teacher(ids).logits[0].float(), -1)[p - 1 : p - 1 + t]
            s_ids = sl.argsort(-1, descending=True)
            t_ids = tl.argsort(-1, descending=True)
            y = completions[b, :t]
            out.append(
                Example(
                    prompt_ids=prompt_of(prompts, b).numpy(),
                    response_ids=y.numpy(),
                    topk_ids=s_ids.numpy(),
                    old=sl.gather(1, s_ids).numpy(),
                    teacher=tl.gather(1, s_ids).numpy(),
                    weight=np.ones(t, dtype=np.float32),  # OPD: L = 1
                    old_y=sl.gather(1, y[:, None])[:, 0].numpy(),
                    teacher_ids=t_ids.numpy(),
                    teacher_topk=tl.gather(1, t_ids).numpy(),
                    teacher_y=tl.gather(1, y[:, None])[:, 0].numpy(),
                )
            )
    return out


def opdcache_loss(objective, tok, student, examples) -> torch.Tensor:
    batch = collate(examples, tok.pad_token_id)
    loss, _ = policy_loss(objective, forward_terms(student, batch))
    return loss


def grads(model, loss) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_opdcache_full_vocabulary_loss_equals_trl_beta_one(pair, tmp_path):
    tok, student, teacher, prompts, completions, lengths = pair
    naive = naive_reverse_kl(student, teacher, prompts, completions, lengths).detach()
    examples = opdcache_examples(student, teacher, prompts, completions, lengths)
    ours = {o: opdcache_loss(o, tok, student, examples) for o in ("bucket", "sum-and-sample")}
    theirs = trl_loss(tok, student, teacher, prompts, completions, lengths, tmp_path)
    assert naive.item() > 1e-3  # two random models: a KL well away from 0
    torch.testing.assert_close(theirs.detach(), naive, rtol=1e-5, atol=1e-6)
    for loss in ours.values():
        torch.testing.assert_close(loss.detach(), naive, rtol=1e-5, atol=1e-6)
    g_trl = grads(student, trl_loss(tok, student, teacher, prompts, completions, lengths, tmp_path))
    for o in ours:
        g = grads(student, opdcache_loss(o, tok, student, examples))
        torch.testing.assert_close(g, g_trl, rtol=1e-4, atol=1e-7)
