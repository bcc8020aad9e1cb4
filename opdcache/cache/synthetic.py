"""Synthetic cache shards with controllable top-k overlap, for tests, benchmarks and SQL tryouts.

Ids are uniform over the vocabulary (the incompressible worst case for storage). At depth tau a
teacher top-k entry is copied from the student's top-k with probability
``max(0, overlap - drift * tau / 1000)``, so ``drift > 0`` imitates prefix drift. Log-probs are a
proper log-softmax over k visible entries plus a tail, so top-p acceptance is meaningful.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from opdcache.cache.schema import CacheMeta
from opdcache.cache.shards import write_cache_shard
from opdcache.rundir import RunDir


def _topk_logprobs(rng: np.random.Generator, n: int, k: int, tail: float) -> np.ndarray:
    logits = np.sort(rng.gumbel(size=(n, k)).astype(np.float32) * 2.0, axis=1)[:, ::-1]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p *= (1.0 - tail) / p.sum(axis=1, keepdims=True)
    return np.log(p).astype(np.float32)


def synthetic_columns(
    n_prompts: int,
    n_samples: int = 2,
    mean_len: int = 400,
    max_tokens: int = 1024,
    vocab: int = 152_064,
    k: int = 16,
    overlap: float = 0.7,
    drift: float = 0.0,
    seed: int = 0,
    prompt_offset: int = 0,
) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    b = n_prompts * n_samples
    lengths = np.clip(rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, size=b), 1, max_tokens)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    n = int(offsets[-1])
    depth = np.arange(n) - np.repeat(offsets[:-1], lengths)

    s_ids = rng.integers(0, vocab, size=(n, k), dtype=np.int32)
    t_ids = rng.integers(0, vocab, size=(n, k), dtype=np.int32)
    p_share = np.clip(overlap - drift * depth / 1000.0, 0.0, 1.0)[:, None]
    share = rng.random((n, k)) < p_share
    perm = np.argsort(rng.random((n, k)), axis=1)
    t_ids = np.where(share, np.take_along_axis(s_ids, perm, axis=1), t_ids)
    # a shared id may now appear twice in the teacher row; keep top-k sets distinct
    t_sorted = np.sort(t_ids, axis=1)
    dup = (t_sorted[:, 1:] == t_sorted[:, :-1]).any(axis=1)
    t_ids[dup] = np.take_along_axis(s_ids[dup], perm[dup], axis=1)

    s_lp = _topk_logprobs(rng, n, k, tail=0.03)
    t_lp = _topk_logprobs(rng, n, k, tail=0.03)
    t_on_s = np.minimum(s_lp + rng.normal(0, 0.5, size=(n, k)).astype(np.float32), -1e-3)
    # the sampled token: usually one of the student's top-k (by its probability), sometimes not
    cum = np.cumsum(np.exp(s_lp), axis=1)
    pick = (rng.random((n, 1)) * cum[:, -1:] > cum).sum(axis=1).clip(0, k - 1)
    rows = np.arange(n)
    outside = rng.random(n) < 0.03
    resp = np.where(outside, rng.integers(0, vocab, size=n), s_ids[rows, pick]).astype(np.int32)
    s_logprob = np.where(outside, np.float32(-8.0), s_lp[rows, pick]).astype(np.float32)
    t_logprob = np.where(outside, np.float32(-9.0), t_on_s[rows, pick]).astype(np.float32)

    def split(a: np.ndarray, per: int = 1) -> list[np.ndarray]:
        return np.split(a.reshape(-1), offsets[1:-1] * per)

    finish = np.where(lengths >= max_tokens, "length", "stop")
    return {
        "prompt_id": [f"p{prompt_offset + i // n_samples:06d}" for i in range(b)],
        "sample": np.tile(np.arange(n_samples, dtype=np.int32), n_prompts),
        "prompt_ids": [rng.integers(0, vocab, size=24, dtype=np.int32) for _ in range(b)],
        "response_ids": split(resp),
        "finish_reason": finish.tolist(),
        "max_tokens": np.full(b, max_tokens, dtype=np.int32),
        "student_logprob": split(s_logprob),
        "student_topk_ids": split(s_ids, k),
        "student_topk_logprobs": split(s_lp, k),
        "teacher_topk_ids": split(t_ids, k),
        "teacher_topk_logprobs": split(t_lp, k),
        "teacher_logprob": split(t_logprob),
        "teacher_logprob_on_student_topk": split(t_on_s, k),
    }


def write_synthetic_run(
    root: str | Path,
    rounds: int = 2,
    parts_per_round: int = 2,
    prompts_per_part: int = 8,
    k: int = 16,
    seed: int = 0,
    **kwargs: object,
) -> RunDir:
    """A run directory whose cache holds synthetic shards (no model involved)."""
    run = RunDir(root)
    meta = CacheMeta(k=k, student_model="synthetic-student", teacher_model="synthetic-teacher")
    for r in range(rounds):
        for part in range(parts_per_round):
            cols = synthetic_columns(
                prompts_per_part,
                k=k,
                seed=seed * 1_000_003 + r * 1009 + part,
                prompt_offset=part * prompts_per_part,
                **kwargs,  # type: ignore[arg-type]
            )
            write_cache_shard(run.cache_round(r) / run.part_name(part), cols, meta)
    return run


def write_benchmark_cache(
    root: str | Path, positions: int, mean_len: int, prompts_per_part: int = 50
) -> RunDir:
    """One round of about ``positions`` synthetic positions at a real model's size (Qwen's 152,064-token
    vocabulary, k = 16, 70 % overlap, 2 samples per prompt): what the storage benchmarks measure."""
    parts = max(1, -(-positions // (prompts_per_part * 2 * mean_len)))
    return write_synthetic_run(
        root,
        rounds=1,
        parts_per_round=parts,
        prompts_per_part=prompts_per_part,
        mean_len=mean_len,
        max_tokens=2 * mean_len,
        vocab=152_064,
        k=16,
        overlap=0.7,
    )
