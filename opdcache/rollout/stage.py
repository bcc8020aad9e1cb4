"""The rollout stage: student samples + student top-k into RUN/rollouts/round=<r>/ (vLLM).

    opdcache rollout RUN --round R

Round r's prompts (a seeded shuffle of the prompt file, ``rollout.prompts_per_round`` of them) are
split into parts of ``rollout.part_size`` prompts; each part is generated with n samples per
prompt at the controller's budget M_r and written atomically. A rerun skips parts already written
(here or, completed by the teacher stage, in RUN/cache/), so a killed rollout resumes. Arm
prune-inflight scores each sample with the teacher while it grows (rollout/inflight.py) and writes
complete parts straight to RUN/cache/: its teacher stage finds nothing left to do.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from opdcache.arms import ArmPlan, plan
from opdcache.cache.schema import CACHE_COLUMNS, ROLLOUT_COLUMNS, CacheMeta
from opdcache.cache.shards import write_cache_shard
from opdcache.config import RunConfig
from opdcache.errors import OpdcacheError
from opdcache.models.checkpoint import student_checkpoint
from opdcache.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from opdcache.prompts import Prompt, encode_prompts, load_prompts, round_prompts
from opdcache.results import RolloutResult
from opdcache.rollout import engine, inflight
from opdcache.rundir import RunDir
from opdcache.shard import WHOLE, Shard
from opdcache.teacher.forward import GrowingResponse
from opdcache.teacher.stage import ResidentTeacher, teacher_vocab


def rollout_round(
    run: RunDir,
    r: int,
    cfg: RunConfig,
    max_tokens: int,
    progress: bool = True,
    engines: engine.PersistentEngine | None = None,
    teacher: ResidentTeacher | None = None,
    shard: Shard = WHOLE,
    *,
    student: Callable[[], str] | None = None,
    arm: ArmPlan | None = None,
) -> RolloutResult:
    """Generate round ``r``'s missing rollout parts at budget ``max_tokens`` (M_r, decided by the caller).

    With ``engines`` (``opdcache run``) the engine outlives the round; without, one is started and
    shut down here. Arm prune-inflight also needs the teacher (``teacher``: kept across rounds).
    With ``shard`` i/N this worker generates parts p with p mod N = i; each prompt's samples draw from
    a seed of their own (``engine.request_seed`` of rollout.seed, round and prompt id), so its rows are
    the same whichever worker, batch or launch generates them. ``student`` (a call returning the round's
    checkpoint) and ``arm`` (the arm's plan) where the caller has them (``stages.RoundContext``).
    """
    run.require()
    rc = cfg.rollout
    prompts, encoded, student, tokenizer, max_len = _round_prompts(run, cfg, r, max_tokens, student)
    parts = [
        list(range(i, min(i + rc.part_size, len(prompts)))) for i in range(0, len(prompts), rc.part_size)
    ]
    mine = [p for p in range(len(parts)) if shard.owns(p)]
    done = {p: run.done("rollout", r, part=run.part_name(p)) for p in mine}
    if all(done.values()):
        return RolloutResult(r, max_tokens, len(mine), len(mine))
    meta = CacheMeta(
        k=rc.k,
        student_model=student,
        student_fingerprint=model_fingerprint(student),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    seed = int(np.random.default_rng([rc.seed, r]).integers(2**31))  # the engine's seed: per round
    own = engines is None
    if own:
        engines = engine.PersistentEngine(**engine_settings(cfg))
    llm, startup = engines.get(student, rc.k, max_len, seed)
    scorer = None
    if (arm or plan(cfg)).inflight:  # in flight the rollout writes complete cache parts: the teacher runs
        scorer, meta, load_seconds = _inflight_scorer(cfg, student, teacher, meta)
        startup += load_seconds
    bar = tqdm(
        total=sum(len(parts[p]) for p in mine),
        initial=sum(len(parts[p]) for p in mine if done[p]),
        desc=f"rollout round {r}",
        unit="prompt",
        disable=not progress,
    )
    t0, tokens, generated, teacher_positions = time.perf_counter(), 0, 0, 0
    try:
        for p in (p for p in mine if not done[p]):
            idx = parts[p]
            batch = ([prompts[i] for i in idx], [encoded[i] for i in idx])
            written, decoded, positions = _roll_part(run, r, p, llm, cfg, batch, max_tokens, scorer, meta)
            tokens += written
            generated += decoded
            teacher_positions += positions
            bar.update(len(idx))
            bar.set_postfix(tok_per_s=f"{generated / (time.perf_counter() - t0):.0f}")
    finally:
        if own:
            engines.close()
    bar.close()
    return RolloutResult(
        r,
        max_tokens,
        len(mine),
        sum(done.values()),
        tokens,
        time.perf_counter() - t0,
        startup,
        generated,
        teacher_positions,
    )


def _roll_part(
    run: RunDir,
    r: int,
    p: int,
    llm: Any,
    cfg: RunConfig,
    batch: tuple[list[Prompt], list[list[int]]],
    max_tokens: int,
    scorer: Any,
    meta: CacheMeta,
) -> tuple[int, int, int]:
    """Part ``p``: its samples written (rollout part, or in flight a whole cache part); (tokens
    written, tokens decoded, teacher positions scored)."""
    prompts, ids = batch
    samples, decoded, positions = _generate(llm, cfg, r, prompts, ids, max_tokens, scorer)
    cols = _columns(samples, prompts, ids, max_tokens, scorer is not None)
    part_meta = dataclasses.replace(meta, answers={pr.prompt_id: pr.answer for pr in prompts})
    if scorer is None:
        written = write_cache_shard(run.rollout_round(r) / run.part_name(p), cols, part_meta, rollout=True)
        return written, written, positions
    written = write_cache_shard(run.cache_round(r) / run.part_name(p), cols, part_meta)
    return written, decoded, positions


def _round_prompts(
    run: RunDir, cfg: RunConfig, r: int, max_tokens: int, student: Callable[[], str] | None
) -> tuple[list[Prompt], list[list[int]], str, Any, int]:
    """Round r's prompts, their token ids, the student, its tokenizer and the engine's context length;
    a prompt that leaves no room for ``max_tokens`` is refused."""
    from transformers import AutoTokenizer

    rc = cfg.rollout
    all_prompts = load_prompts(cfg.data.prompts, cfg.data.fields, quiet=True)
    prompts = round_prompts(all_prompts, r, rc.prompts_per_round, rc.seed)
    student = student() if student else student_checkpoint(run, cfg, r)
    tokenizer = AutoTokenizer.from_pretrained(student)
    encoded = encode_prompts(tokenizer, prompts, cfg.data.template, cfg.data.chat_template)
    max_len = context_length(cfg, student, max(len(e) for e in encoded))
    for pr, ids in zip(prompts, encoded, strict=True):
        if len(ids) + max_tokens > max_len:
            raise OpdcacheError(
                f"prompt {pr.prompt_id!r}: {len(ids)} prompt tokens + budget {max_tokens} exceed the context "
                f"length {max_len} (rollout.max_model_len / the model's max_position_embeddings)"
            )
    return prompts, encoded, student, tokenizer, max_len


def _inflight_scorer(
    cfg: RunConfig, student: str, teacher: ResidentTeacher | None, meta: CacheMeta
) -> tuple[Any, CacheMeta, float]:
    """In flight the rollout writes complete cache parts: (a teacher scorer per prompt, the parts'
    metadata naming the teacher, the teacher's load seconds)."""
    vocab = teacher_vocab(cfg, student)
    model, t_fp, load_seconds = (teacher or ResidentTeacher()).get(cfg)
    meta = dataclasses.replace(meta, teacher_model=cfg.models.teacher, teacher_fingerprint=t_fp)
    k, chunk_positions = cfg.rollout.k, cfg.teacher.chunk_positions
    return (lambda prompt: GrowingResponse(model, prompt, k, vocab, chunk_positions)), meta, load_seconds


def _generate(
    llm: Any,
    cfg: RunConfig,
    r: int,
    prompts: list[Prompt],
    batch: list[list[int]],
    max_tokens: int,
    scorer: Any,
) -> tuple[list[list[tuple[Any, str]]], int, int]:
    """One part's samples (arrays, finish reason) per prompt, the tokens decoded in flight and the
    teacher positions scored in flight (both 0 without ``scorer``)."""
    rc = cfg.rollout
    # per prompt, not per part or arm: arms sharing a checkpoint share their samples (up to the
    # shorter budget), whichever worker, launch or batch generates them
    seeds = [engine.request_seed(rc.n_samples, rc.seed, r, pr.prompt_id) for pr in prompts]
    if scorer is None:
        outs = engine.generate(llm, batch, rc.n_samples, rc.temperature, max_tokens, rc.k, seeds=seeds)
        samples = [
            [(engine.completion_arrays(c, rc.k), str(c.finish_reason)) for c in out.outputs] for out in outs
        ]
        return samples, 0, 0
    grown, decoded = inflight.generate_inflight(
        llm, batch, rc.n_samples, max_tokens, rc.k, rc.chunk_tokens, rc.unreliable_tail,
        cfg.score.spec, scorer, rc.temperature, seeds,
    )  # fmt: skip
    positions = sum(s.teacher.positions for row in grown for s in row)
    return [[s.result() for s in row] for row in grown], decoded, positions


def context_length(cfg: RunConfig, checkpoint: str, longest_prompt: int) -> int:
    """The rollout engine's context: rollout.max_model_len, else the longest prompt + the arm's M_max
    (capped at the model's own limit); the same every round, so one engine serves the whole run."""
    from transformers import AutoConfig

    if cfg.rollout.max_model_len:
        return cfg.rollout.max_model_len
    limit = getattr(AutoConfig.from_pretrained(checkpoint), "max_position_embeddings", None) or 1 << 30
    return min(limit, longest_prompt + plan(cfg).budget.max)


def run_context_length(cfg: RunConfig, checkpoint: str) -> int:
    """context_length over every training prompt (any round's batch fits)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    prompts = load_prompts(cfg.data.prompts, cfg.data.fields, quiet=True)
    return context_length(
        cfg,
        checkpoint,
        max(len(e) for e in encode_prompts(tok, prompts, cfg.data.template, cfg.data.chat_template)),
    )


def engine_settings(cfg: RunConfig) -> dict[str, Any]:
    """make_llm's settings from the run config (besides model, k, context and seed)."""
    rc = cfg.rollout
    return {
        "dtype": rc.dtype,
        "kv_cache_gib": rc.kv_cache_gib,
        "gpu_memory_utilization": rc.gpu_memory_utilization,
        "enforce_eager": rc.enforce_eager,
        "max_num_batched_tokens": rc.max_num_batched_tokens,
        "tensor_parallel_size": rc.tensor_parallel_size,
    }


def _columns(
    samples: list[list[tuple[dict[str, np.ndarray], str]]],
    prompts: list[Prompt],
    encoded: list[list[int]],
    max_tokens: int,
    with_teacher: bool = False,
) -> dict:
    """Rollout columns (with ``with_teacher``: cache columns) from each prompt's samples: (completion
    arrays, finish reason)."""
    cols: dict[str, list] = {c.name: [] for c in (CACHE_COLUMNS if with_teacher else ROLLOUT_COLUMNS)}
    for row, pr, ids in zip(samples, prompts, encoded, strict=True):
        for s, (arrays, finish_reason) in enumerate(row):
            cols["prompt_id"].append(pr.prompt_id)
            cols["sample"].append(s)
            cols["prompt_ids"].append(np.asarray(ids, dtype=np.int32))
            cols["finish_reason"].append(finish_reason)
            cols["max_tokens"].append(max_tokens)
            for name, a in arrays.items():
                cols[name].append(a.reshape(-1))
    return cols
