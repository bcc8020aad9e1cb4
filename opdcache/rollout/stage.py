"""The rollout stage: student samples + student top-k into RUN/rollouts/round=<r>/ (vLLM).

    opdcache rollout RUN --round R

Round r's prompts (a seeded shuffle of the prompt file, ``rollout.prompts_per_round`` of them) are
split into parts of ``rollout.part_size`` prompts; each part is generated with n samples per
prompt at the controller's budget M_r and written atomically. A rerun skips parts already written
(here or, completed by the teacher stage, in RUN/cache/), so a killed rollout resumes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from opdcache.arms import plan
from opdcache.budget import BudgetController
from opdcache.cache.schema import ROLLOUT_COLUMNS, CacheMeta
from opdcache.cache.shards import write_cache_shard
from opdcache.config import RunConfig
from opdcache.errors import OpdcacheError
from opdcache.models.checkpoint import require_checkpoint
from opdcache.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from opdcache.rollout import engine
from opdcache.rollout.prompts import Prompt, load_prompts, render, round_prompts
from opdcache.rundir import RunDir


def student_checkpoint(run: RunDir, cfg: RunConfig, r: int) -> str:
    """The checkpoint round ``r`` samples from: RUN/checkpoints/round=<r> if trained, else models.student."""
    ckpt = run.checkpoint(r)
    if ckpt.is_dir():
        return require_checkpoint(str(ckpt), f"round-{r} student")
    if not cfg.models.student:
        raise OpdcacheError("models.student is not set in the run config")
    return require_checkpoint(cfg.models.student, "student")


def part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


def encode_prompts(tokenizer: Any, prompts: list[Prompt], template: str, chat: bool) -> list[list[int]]:
    out = []
    for pr in prompts:
        text = render(pr.question, template)
        if chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
        else:
            ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise OpdcacheError(f"prompt {pr.prompt_id!r}: renders to zero tokens")
        out.append(list(ids))
    return out


def rollout_round(root: str | Path, r: int, cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Generate round ``r``'s missing rollout parts; returns counts and throughput."""
    from transformers import AutoConfig, AutoTokenizer

    run = RunDir(root).require()
    rc = cfg.rollout
    prompts = round_prompts(load_prompts(cfg.data.prompts), r, rc.prompts_per_round, rc.seed)
    max_tokens = BudgetController(run.root, plan(cfg).budget).max_tokens_for(r)
    student = student_checkpoint(run, cfg, r)
    tokenizer = AutoTokenizer.from_pretrained(student)
    encoded = encode_prompts(tokenizer, prompts, cfg.data.template, cfg.data.chat_template)
    model_limit = getattr(AutoConfig.from_pretrained(student), "max_position_embeddings", None) or 1 << 30
    longest = max(len(e) for e in encoded)
    max_len = rc.max_model_len or min(model_limit, longest + plan(cfg).budget.max)
    for pr, ids in zip(prompts, encoded, strict=True):
        if len(ids) + max_tokens > max_len:
            raise OpdcacheError(
                f"prompt {pr.prompt_id!r}: {len(ids)} prompt tokens + budget {max_tokens} exceed the context "
                f"length {max_len} (rollout.max_model_len / the model's max_position_embeddings)"
            )

    parts = [
        list(range(i, min(i + rc.part_size, len(prompts)))) for i in range(0, len(prompts), rc.part_size)
    ]
    done = [
        (run.rollout_round(r) / part_name(p)).exists() or (run.cache_round(r) / part_name(p)).exists()
        for p in range(len(parts))
    ]
    summary = {"round": r, "max_tokens": max_tokens, "parts": len(parts), "skipped": sum(done), "tokens": 0}
    if all(done):
        return summary
    meta = CacheMeta(
        k=rc.k,
        student_model=student,
        student_fingerprint=model_fingerprint(student),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    t_start = time.perf_counter()
    llm = engine.make_llm(
        student,
        rc.k,
        max_len,
        rc.seed,
        rc.dtype,
        rc.kv_cache_gib,
        rc.gpu_memory_utilization,
        rc.enforce_eager,
    )
    bar = tqdm(
        total=len(prompts),
        initial=sum(len(parts[p]) for p in range(len(parts)) if done[p]),
        desc=f"rollout round {r}",
        unit="prompt",
        disable=not progress,
    )
    t0, tokens = time.perf_counter(), 0
    summary["engine_start_seconds"] = t0 - t_start
    try:
        for p, idx in enumerate(parts):
            if done[p]:
                continue
            outs = engine.generate(
                llm,
                [encoded[i] for i in idx],
                rc.n_samples,
                rc.temperature,
                max_tokens,
                rc.k,
                seed=int(np.random.default_rng([rc.seed, r, p]).integers(2**31)),
            )
            cols = _columns(outs, [prompts[i] for i in idx], [encoded[i] for i in idx], rc.k, max_tokens)
            tokens += write_cache_shard(run.rollout_round(r) / part_name(p), cols, meta, rollout=True)
            bar.update(len(idx))
            bar.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    finally:
        engine.shutdown(llm)
    bar.close()
    summary["tokens"] = tokens
    summary["tokens_per_s"] = tokens / (time.perf_counter() - t0)
    return summary


def _columns(
    outs: list[Any], prompts: list[Prompt], encoded: list[list[int]], k: int, max_tokens: int
) -> dict:
    cols: dict[str, list] = {c.name: [] for c in ROLLOUT_COLUMNS}
    for out, pr, ids in zip(outs, prompts, encoded, strict=True):
        for s, completion in enumerate(out.outputs):
            arrays = engine.completion_arrays(completion, k)
            cols["prompt_id"].append(pr.prompt_id)
            cols["sample"].append(s)
            cols["prompt_ids"].append(np.asarray(ids, dtype=np.int32))
            cols["finish_reason"].append(str(completion.finish_reason))
            cols["max_tokens"].append(max_tokens)
            for name, a in arrays.items():
                cols[name].append(a.reshape(-1))
    return cols
