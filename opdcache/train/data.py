"""Training examples from a round's cache parts and one variant's score parts (no model calls)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from opdcache.cache.schema import SCORE_BY_NAME
from opdcache.cache.shards import flat, read_cache_shard, read_score_shard, whole_round
from opdcache.errors import OpdcacheError
from opdcache.rundir import RunDir

CACHE_COLS = [
    "prompt_id",
    "sample",
    "prompt_ids",
    "response_ids",
    "student_topk_ids",
    "student_topk_logprobs",
    "teacher_logprob_on_student_topk",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
    "teacher_logprob",
]


@dataclass
class Example:
    prompt_ids: np.ndarray  # [P]
    response_ids: np.ndarray  # [T]
    topk_ids: np.ndarray  # [T, k]
    old: np.ndarray  # [T, k] rollout-time student log-probs
    teacher: np.ndarray  # [T, k] teacher log-probs at the same ids
    weight: np.ndarray  # [T] L_tau of the variant
    rel: np.ndarray | None = None  # [T] R_tau (objectives that switch on R; None: not read)
    grpo_adv: float = 0.0  # the response's GRPO advantage (outcome variants)
    old_y: np.ndarray | None = None  # [T] old log-prob of the sampled token (the trainer's recompute)
    teacher_ids: np.ndarray | None = None  # [T, k] the teacher's top-k ids
    teacher_topk: np.ndarray | None = None  # [T, k] its log-probs at them
    teacher_y: np.ndarray | None = None  # [T] the teacher's log-prob of the sampled token
    sampler_weight: np.ndarray | None = None  # [T] p_old(y) / p_old,T(y) (rollouts at T != 1)


def load_examples(run: RunDir, r: int, variant: str, outcome: bool = False) -> list[Example]:
    """The round's responses (empty ones left out) with ``variant``'s weights; with ``outcome`` also its
    reliabilities R and GRPO advantages (the prune-grpo / grpo objectives)."""
    parts = whole_round(run, r)
    scored = whole_round(run, r, variant)
    out = []
    for part, spath in zip(parts, scored, strict=True):
        cache, meta = read_cache_shard(part, CACHE_COLS)
        names = ("prompt_id", "sample", "weight", *(("reliability", "grpo_advantage") if outcome else ()))
        score, params = read_score_shard(spath, [SCORE_BY_NAME[c] for c in names])
        if outcome and not params.get("outcome"):
            raise OpdcacheError(
                f"{spath}: variant {variant!r} has no outcome rewards; score it with score.outcome"
            )
        for key in ("prompt_id", "sample"):
            if cache.column(key).to_pylist() != score.column(key).to_pylist():
                raise OpdcacheError(f"{spath}: rows do not match {part} (column {key}); re-score the variant")
        k = meta.k
        resp, off = flat(cache.column("response_ids"))
        ids = flat(cache.column("student_topk_ids"))[0].reshape(-1, k)
        old = flat(cache.column("student_topk_logprobs"))[0].reshape(-1, k)
        teach = flat(cache.column("teacher_logprob_on_student_topk"))[0].reshape(-1, k)
        t_ids = flat(cache.column("teacher_topk_ids"))[0].reshape(-1, k)
        t_lp = flat(cache.column("teacher_topk_logprobs"))[0].reshape(-1, k)
        t_y = flat(cache.column("teacher_logprob"))[0]
        weight = flat(score.column("weight"))[0]
        rel = flat(score.column("reliability"))[0] if outcome else None
        adv = score.column("grpo_advantage").to_numpy() if outcome else np.zeros(cache.num_rows)
        prompts = cache.column("prompt_ids").to_numpy(zero_copy_only=False)
        for i in range(cache.num_rows):
            a, b = off[i], off[i + 1]
            if b > a:
                ex = Example(
                    prompts[i], resp[a:b], ids[a:b], old[a:b], teach[a:b], weight[a:b],
                    teacher_ids=t_ids[a:b], teacher_topk=t_lp[a:b], teacher_y=t_y[a:b],
                )  # fmt: skip
                out.append(ex if rel is None else replace(ex, rel=rel[a:b], grpo_adv=float(adv[i])))
    return out


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; ``positions`` index the logits that predict each response token."""
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in batch]
    t_max = max(len(e.response_ids) for e in batch)
    k = batch[0].topk_ids.shape[1]
    b = len(batch)
    input_ids = torch.full((b, max(lengths)), pad_id, dtype=torch.long)
    attention = torch.zeros((b, max(lengths)), dtype=torch.long)
    positions = torch.zeros((b, t_max), dtype=torch.long)
    mask = torch.zeros((b, t_max), dtype=torch.bool)
    topk = torch.zeros((b, t_max, k), dtype=torch.long)
    old = torch.zeros((b, t_max, k))
    teacher = torch.zeros((b, t_max, k))
    weight = torch.zeros((b, t_max))
    response = torch.zeros((b, t_max), dtype=torch.long)
    rel = torch.zeros((b, t_max))
    old_y = torch.zeros((b, t_max))
    teacher_ids = torch.zeros((b, t_max, k), dtype=torch.long)
    teacher_topk = torch.zeros((b, t_max, k))
    teacher_y = torch.zeros((b, t_max))
    sampler_weight = torch.ones((b, t_max))
    grpo_adv = torch.tensor([e.grpo_adv for e in batch], dtype=torch.float32)
    for i, e in enumerate(batch):
        p, t = len(e.prompt_ids), len(e.response_ids)
        input_ids[i, : p + t] = torch.from_numpy(
            np.concatenate([e.prompt_ids, e.response_ids]).astype(np.int64)
        )
        attention[i, : p + t] = 1
        positions[i, :t] = torch.arange(p - 1, p - 1 + t)
        mask[i, :t] = True
        topk[i, :t] = torch.tensor(e.topk_ids, dtype=torch.long)
        old[i, :t] = torch.tensor(e.old)
        teacher[i, :t] = torch.tensor(e.teacher)
        weight[i, :t] = torch.tensor(e.weight)
        response[i, :t] = torch.from_numpy(e.response_ids.astype(np.int64))
        if e.rel is not None:
            rel[i, :t] = torch.tensor(e.rel)
        if e.old_y is not None:
            old_y[i, :t] = torch.tensor(e.old_y)
        if e.teacher_ids is not None:
            teacher_ids[i, :t] = torch.tensor(e.teacher_ids, dtype=torch.long)
            teacher_topk[i, :t] = torch.tensor(e.teacher_topk)
            teacher_y[i, :t] = torch.tensor(e.teacher_y)
        if e.sampler_weight is not None:
            sampler_weight[i, :t] = torch.tensor(e.sampler_weight)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "positions": positions,
        "mask": mask,
        "topk_ids": topk,
        "old": old,
        "teacher": teacher,
        "weight": weight,
        "response_ids": response,
        "rel": rel,
        "old_y": old_y,
        "grpo_adv": grpo_adv,
        "teacher_ids": teacher_ids,
        "teacher_topk": teacher_topk,
        "teacher_y": teacher_y,
        "sampler_weight": sampler_weight,
    }
