"""Training examples from a round's cache parts and one variant's score parts (no model calls)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opdcache.cache.schema import SCORE_BY_NAME
from opdcache.cache.shards import flat, read_cache_shard, read_score_shard
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
]


@dataclass
class Example:
    prompt_ids: np.ndarray  # [P]
    response_ids: np.ndarray  # [T]
    topk_ids: np.ndarray  # [T, k]
    old: np.ndarray  # [T, k] rollout-time student log-probs
    teacher: np.ndarray  # [T, k] teacher log-probs at the same ids
    weight: np.ndarray  # [T] L_tau of the variant


def load_examples(run: RunDir, r: int, variant: str) -> list[Example]:
    parts = run.shards(run.cache_round(r))
    if not parts:
        raise OpdcacheError(f"{run.cache_round(r)}: no cache parts to train on")
    out = []
    for part in parts:
        spath = run.score_round(variant, r) / part.name
        if not spath.exists():
            raise OpdcacheError(f"{spath}: missing; score round {r} with variant {variant!r} first")
        cache, meta = read_cache_shard(part, CACHE_COLS)
        score, _ = read_score_shard(spath, [SCORE_BY_NAME[c] for c in ("prompt_id", "sample", "weight")])
        for key in ("prompt_id", "sample"):
            if cache.column(key).to_pylist() != score.column(key).to_pylist():
                raise OpdcacheError(f"{spath}: rows do not match {part} (column {key}); re-score the variant")
        k = meta.k
        resp, off = flat(cache.column("response_ids"))
        ids = flat(cache.column("student_topk_ids"))[0].reshape(-1, k)
        old = flat(cache.column("student_topk_logprobs"))[0].reshape(-1, k)
        teach = flat(cache.column("teacher_logprob_on_student_topk"))[0].reshape(-1, k)
        weight = flat(score.column("weight"))[0]
        prompts = cache.column("prompt_ids").to_numpy(zero_copy_only=False)
        for i in range(cache.num_rows):
            a, b = off[i], off[i + 1]
            if b > a:
                out.append(Example(prompts[i], resp[a:b], ids[a:b], old[a:b], teach[a:b], weight[a:b]))
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
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "positions": positions,
        "mask": mask,
        "topk_ids": topk,
        "old": old,
        "teacher": teacher,
        "weight": weight,
    }
