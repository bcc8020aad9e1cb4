"""The score stage: cache shards -> score shards of one variant (eqs. 6-12, App. A.10).

    opdcache score RUN --variant NAME [--metric overlap|top_p|none|random] [--gamma 0.7] ...

Every cache part ``cache/round=r/P.parquet`` gets a score part ``scores/NAME/round=r/P.parquet``
with the same rows in the same order. The variant is built under ``RUN/.staging`` and swapped in
with renames, so readers see the old variant or the new one, never a mix, and a crash leaves the
old one untouched. Re-scoring only some rounds keeps the others (hard links), and is refused when
the parameters differ from those the existing variant was scored with.

Sharded (``--shard i/N``, or RANK / WORLD_SIZE under torchrun), worker i scores the cache parts p with
p mod N = i that the variant lacks, each written in place atomically (no staging, no swap), so N
workers complete the variant together and a killed worker's parts are redone by the next launch of
any worker count. Nothing is written once all parts are present: the variant is its parts, and a
round counts as scored only when every cache part has its score part (``RunDir.done``; the budget's
``read_effective_lengths`` refuses a partial round). A sharded call completes a variant, it never
re-scores one: existing parts scored with other parameters are refused (re-score unsharded).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from opdcache.cache.schema import SCORE_BY_NAME
from opdcache.cache.shards import (
    flat,
    list_array,
    read_cache_meta,
    read_cache_shard,
    read_score_shard,
    read_variant_params,
    score_file_metadata,
    whole_round,
    write_parquet,
)
from opdcache.errors import CacheFormatError, OpdcacheError
from opdcache.results import ScoreResult, ScoreRound
from opdcache.rundir import (
    RunDir,
    clean_stale_staging,
    recover_interrupted_swaps,
    remove_dead_leftovers,
    replace_dir,
    round_dir,
)
from opdcache.score import reliability as rl
from opdcache.shard import WHOLE, Shard
from opdcache.variant import VariantSpec


@dataclass
class ShardScores:
    """Per-position score arrays of one shard (ragged layout, see reliability.py)."""

    offsets: np.ndarray
    metric_values: np.ndarray  # overlap (float32) or accept (bool)
    bad: np.ndarray
    rel: np.ndarray
    weight: np.ndarray
    effective_len: np.ndarray
    outcome: np.ndarray | None = None  # [B] float32 0/1, with an outcome checker (VariantSpec.outcome)
    grpo_advantage: np.ndarray | None = None  # [B] float32
    zero_variance: np.ndarray | None = None  # [B] bool: the response's prompt group is all equal


def outcome_rewards(
    table: pa.Table, answers: dict[str, str], spec: VariantSpec, tokenizer: Any, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(outcome, GRPO advantage, zero-variance flag) per response of a cache table: the decoded
    response graded by ``spec.outcome`` against the part's gold answer (CacheMeta.answers), the
    advantage over the samples of each prompt (reliability.grpo_advantages)."""
    from opdcache.grading import grader

    ids = table.column("prompt_id").to_pylist()
    if missing := sorted(set(ids) - set(answers)):
        raise OpdcacheError(
            f"{where}: no gold answer for prompt(s) {missing[:3]} (a part written before opdcache recorded "
            "answers in the cache); an outcome variant needs the round rolled out again"
        )
    resp, off = flat(table.column("response_ids"))
    texts = tokenizer.batch_decode(
        [resp[a:b].tolist() for a, b in zip(off[:-1], off[1:], strict=True)], skip_special_tokens=True
    )
    check = {pid: grader(answers[pid], spec.outcome) for pid in dict.fromkeys(ids)}
    outcome = np.array([float(check[pid](t)) for pid, t in zip(ids, texts, strict=True)], np.float32)
    adv, zero = rl.grpo_advantages(outcome, np.array(ids), spec.grpo_std_norm, spec.grpo_eps)
    return outcome, adv, zero


def run_tokenizer(run: RunDir) -> Any:
    """The student tokenizer of a run (models.student; training never changes it): decodes responses."""
    from transformers import AutoTokenizer

    from opdcache.config import read_run_config

    cfg = read_run_config(run)
    if cfg is None or not cfg.models.student:
        raise OpdcacheError(
            f"{run.root}: an outcome variant decodes responses with models.student; no config"
        )
    return AutoTokenizer.from_pretrained(cfg.models.student)


def _topk(table: pa.Table, name: str, k: int) -> np.ndarray:
    return flat(table.column(name))[0].reshape(-1, k)


def _columns_needed(spec: VariantSpec) -> list[str]:
    base = ["prompt_id", "sample", "response_ids"]
    if spec.metric == "top_p":
        return base + ["teacher_topk_ids", "teacher_topk_logprobs"]
    need = base + ["student_topk_ids", "teacher_topk_ids"]
    if spec.metric == "iw":
        need += ["student_logprob", "teacher_logprob"]
    if spec.metric == "random" and spec.match == "mass":
        need += ["student_topk_logprobs", "teacher_logprob_on_student_topk"]
    return need


def bad_events(
    spec: VariantSpec,
    tokens: np.ndarray,
    student_topk_ids: np.ndarray | None,
    teacher_topk_ids: np.ndarray,
    teacher_topk_logprobs: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(metric values, B) per position: overlap O and B = [O < gamma] (eqs. 6-7), or for top_p the
    acceptance and B = [y not in the visible nucleus] (App. A.10). Also used by the in-flight rollout."""
    if spec.metric == "top_p":
        bad = rl.topp_bad_events(tokens, teacher_topk_ids, teacher_topk_logprobs, spec.top_p)
        return ~bad, bad
    overlap = rl.topk_overlap(student_topk_ids, teacher_topk_ids)
    return overlap, rl.overlap_bad_events(overlap, spec.gamma)


def score_shard(table: pa.Table, k: int, spec: VariantSpec, keep: np.ndarray | None = None) -> ShardScores:
    """Score one cache table. ``keep`` (bool [N]) is the random arm's retained-position mask."""
    tokens, offsets = flat(table.column("response_ids"))
    top_p = spec.metric == "top_p"
    metric_values, bad = bad_events(
        spec,
        tokens,
        None if top_p else _topk(table, "student_topk_ids", k),
        _topk(table, "teacher_topk_ids", k),
        _topk(table, "teacher_topk_logprobs", k) if top_p else None,
    )
    if spec.metric in ("overlap", "top_p"):
        rel = rl.reliability(rl.cumulative_bad(bad, offsets), spec.w_drop)
        weight = rl.loss_weight(rel, spec.w_base)
    elif spec.metric in ("none", "iw"):
        bad = np.zeros(len(tokens), dtype=bool)
        rel = np.ones(len(tokens), dtype=np.float32)
        weight = rel.copy()
        if spec.metric == "iw":
            weight = rl.iw_opd_weights(
                flat(table.column("student_logprob"))[0],
                flat(table.column("teacher_logprob"))[0],
                offsets,
                spec.iw_gamma,
            )
    else:
        if keep is None or len(keep) != len(tokens):
            raise ValueError("metric random needs a keep mask with one entry per position")
        bad = ~keep
        rel = keep.astype(np.float32)
        weight = rl.loss_weight(rel, spec.w_base)
    return ShardScores(offsets, metric_values, bad, rel, weight, rl.effective_length(rel, offsets, spec.eps))


def _score_table(keys: pa.Table, s: ShardScores, metric: str) -> pa.Table:
    col = "accept" if metric == "top_p" else "overlap"
    arrays = {
        "prompt_id": keys.column("prompt_id").combine_chunks(),
        "sample": keys.column("sample").combine_chunks(),
        col: list_array(s.metric_values, s.offsets, SCORE_BY_NAME[col].type),
        "bad": list_array(s.bad, s.offsets, SCORE_BY_NAME["bad"].type),
        "reliability": list_array(s.rel, s.offsets, SCORE_BY_NAME["reliability"].type),
        "weight": list_array(s.weight, s.offsets, SCORE_BY_NAME["weight"].type),
        "effective_len": pa.array(s.effective_len, pa.int32()),
    }
    if s.outcome is not None:
        arrays["outcome"] = pa.array(s.outcome, pa.float32())
        arrays["grpo_advantage"] = pa.array(s.grpo_advantage, pa.float32())
    return pa.table(arrays)


def _random_keep_masks(
    run: RunDir, r: int, parts: list[Path], k: int, spec: VariantSpec
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Read the reference variant's R (and the reward mass) of round ``r``; split the matched mask by part."""
    ref_dir = run.score_round(spec.reference or "", r)
    if not ref_dir.is_dir():
        raise OpdcacheError(
            f"random variant: reference variant {spec.reference!r} has no scores for round {r} "
            f"({ref_dir}); score it first"
        )
    rel_col = [SCORE_BY_NAME["reliability"]]
    masses, rels = [], []
    for part in parts:
        ref_path = ref_dir / part.name
        if not ref_path.exists():
            raise OpdcacheError(f"random variant: {ref_path} is missing; re-score {spec.reference!r}")
        ref_table, ref_meta = read_score_shard(ref_path, rel_col)
        if ref_meta.get("metric") == "random":
            raise OpdcacheError(f"random variant: reference {spec.reference!r} is itself random")
        rels.append(flat(ref_table.column("reliability"))[0])
        if spec.match == "mass":
            table, _ = read_cache_shard(part, ["student_topk_logprobs", "teacher_logprob_on_student_topk"])
            reward = rl.opd_reward(
                _topk(table, "student_topk_logprobs", k),
                _topk(table, "teacher_logprob_on_student_topk", k),
            )
            masses.append(np.abs(reward).sum(axis=1))
            if len(masses[-1]) != len(rels[-1]):
                raise OpdcacheError(
                    f"random variant: {ref_path} has {len(rels[-1])} positions, {part} has {len(masses[-1])}; "
                    f"re-score {spec.reference!r}"
                )
    rel = np.concatenate(rels) if rels else np.zeros(0, np.float32)
    mass = np.concatenate(masses) if masses else np.ones(len(rel))
    keep, target, achieved = rl.random_keep_mask(
        rel, mass, spec.match, np.random.default_rng([spec.seed, r]), spec.eps
    )
    bounds = np.cumsum([0] + [len(x) for x in rels])
    masks = [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return masks, {"target": target, "achieved": achieved}


def _existing_params(run: RunDir, name: str) -> dict[str, Any] | None:
    for r in run.rounds(run.variant(name)):
        for part in run.shards(run.score_round(name, r)):
            meta = read_variant_params(part)
            meta.pop("match_stats", None)
            return meta
    return None


def score_run(
    run: RunDir,
    name: str,
    spec: VariantSpec,
    rounds: list[int] | None = None,
    progress: bool = True,
    workers: int = 0,
    shard: Shard = WHOLE,
) -> ScoreResult:
    """Score the cached ``rounds`` (default: all) of a run as variant ``name``; one summary per round.

    ``workers`` parts at once (0: one per core) in threads: Parquet decoding, the numba kernels and
    the encoder release the GIL. Output bytes do not depend on ``workers`` or ``shard``. With ``shard``
    i/N (N > 1): only this worker's missing parts, written in place (module docstring); its summaries
    cover those parts only."""
    todo, parts, k = _check_inputs(run, name, spec, rounds, shard)
    tokenizer = run_tokenizer(run) if spec.outcome else None  # loaded once, before the threads
    sharded = shard.count > 1
    mine = {  # which parts of each round this call scores
        r: [
            not sharded
            or shard.owns(run.part_index(p.name))
            and not run.done("score", r, part=p.name, variant=name)
            for p in paths
        ]
        for r, paths in parts.items()
    }
    staged = _staging(run, name, parts, shard)
    summaries = []
    try:
        bar = tqdm(
            total=sum(sum(m) for m in mine.values()),
            desc=f"score {name}",
            unit="shard",
            disable=not progress,
        )
        for r in todo:
            if any(mine[r]):
                mine_r = [p for p, m in zip(parts[r], mine[r], strict=True) if m]
                summaries.append(
                    _score_round(run, r, parts[r], mine_r, k, spec, tokenizer, staged, workers, bar)
                )
        bar.close()
        if sharded:
            return ScoreResult(name, spec, summaries)
        final = run.variant(name)
        if final.exists():  # keep rounds that were not re-scored
            for r in sorted(set(run.rounds(final)) - set(todo)):
                (staged / round_dir(r)).mkdir(parents=True, exist_ok=True)
                for f in run.score_round(name, r).iterdir():  # parts and their integrity records
                    if not f.name.startswith("."):
                        os.link(f, staged / round_dir(r) / f.name)
        replace_dir(staged, final)
    finally:
        if not sharded:
            shutil.rmtree(staged, ignore_errors=True)
    return ScoreResult(name, spec, summaries)


def _check_inputs(
    run: RunDir, name: str, spec: VariantSpec, rounds: list[int] | None, shard: Shard
) -> tuple[list[int], dict[int, list[Path]], int]:
    """(rounds to score, each round's cache parts, k), every input checked before anything is written."""
    run.require()
    available = run.rounds()
    if not available:
        raise OpdcacheError(f"{run.cache}: no cache rounds (expected round=<r>/ directories of shards)")
    todo = available if rounds is None else sorted(set(rounds))
    if missing := sorted(set(todo) - set(available)):
        raise OpdcacheError(f"rounds {missing} are not in {run.cache} (have {available})")
    if spec.metric == "random" and spec.reference == name:
        raise OpdcacheError("random variant: the reference must be another variant")
    recover_interrupted_swaps(run.scores)
    old = _existing_params(run, name) if run.variant(name).exists() else None
    partial = set(todo) != set(available) or shard.count > 1
    if old is not None and partial and old != spec.to_meta():
        raise OpdcacheError(
            f"variant {name!r} exists with parameters {old}; re-scoring only rounds {todo} with "
            f"{spec.to_meta()} would mix settings. Re-score all rounds or use another variant name"
        )
    parts = {r: whole_round(run, r) for r in todo}
    ks: dict[int, Path] = {}
    for paths in parts.values():
        for p in paths:
            ks.setdefault(read_cache_meta(p).k, p)
    if len(ks) > 1:
        raise CacheFormatError(
            "cache shards disagree on k: " + ", ".join(f"k={k} in {p}" for k, p in ks.items())
        )
    return todo, parts, next(iter(ks))


def _staging(run: RunDir, name: str, parts: dict[int, list[Path]], shard: Shard) -> Path:
    """Where the parts are written: a fresh staging folder, or (a shard) the variant itself."""
    if shard.count > 1:
        # in place, nothing staged; a killed worker's temporaries go, of our own parts only: a pid
        # names a process on its own host, and the other workers may run elsewhere
        for r, paths in parts.items():
            for p in paths:
                if shard.owns(run.part_index(p.name)):
                    remove_dead_leftovers(run.score_round(name, r), f".{p.name}.", ".tmp")
        return run.variant(name)
    clean_stale_staging(run, f"scores-{name}")
    staged = run.staging / f"scores-{name}-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    return staged


def _score_round(
    run: RunDir,
    r: int,
    round_parts: list[Path],
    todo_parts: list[Path],
    k: int,
    spec: VariantSpec,
    tokenizer: Any,
    staged: Path,
    workers: int,
    bar: Any,
) -> ScoreRound:
    """Score ``todo_parts`` of round ``r`` into ``staged``, ``workers`` at a time; the round's summary."""
    masks, match = (  # the random arm's mask is matched over the whole round, then split
        _random_keep_masks(run, r, round_parts, k, spec)
        if spec.metric == "random"
        else ([None] * len(round_parts), {})
    )
    todo_masks = [x for x, p in zip(masks, round_parts, strict=True) if p in todo_parts]
    stats, t_round = _RoundStats(r), time.perf_counter()
    graded = {}  # graded here, in the main thread: math-verify's timeouts use signal.alarm
    for part in todo_parts if spec.outcome else []:
        table, cmeta = read_cache_shard(part, ["prompt_id", "response_ids"])
        graded[part] = outcome_rewards(table, cmeta.answers, spec, tokenizer, str(part))
    meta = {**spec.to_meta(), **({"match_stats": match} if match else {})}

    def one(part: Path, keep: np.ndarray | None) -> ShardScores:
        table, _ = read_cache_shard(part, _columns_needed(spec))
        scores = score_shard(table, k, spec, keep)
        if spec.outcome:
            o, a, z = graded[part]
            scores = dataclasses.replace(scores, outcome=o, grpo_advantage=a, zero_variance=z)
        out = _score_table(table, scores, spec.metric)
        out = out.replace_schema_metadata(score_file_metadata(meta, part.name, out.num_rows))
        write_parquet(staged / round_dir(r) / part.name, out, len(scores.rel))
        return scores

    with ThreadPoolExecutor(min(workers or os.cpu_count() or 1, len(todo_parts))) as pool:
        for scores in pool.map(one, todo_parts, todo_masks):  # in part order
            stats.add(scores)
            bar.update(1)
            bar.set_postfix(pos_per_s=f"{stats.positions / (time.perf_counter() - t_round):.3g}")
    return stats.summary(match, time.perf_counter() - t_round)


class _RoundStats:
    def __init__(self, r: int):
        self.r, self.responses, self.positions = r, 0, 0
        self.metric_sum, self.kept, self.e = 0.0, 0, []

    def add(self, s: ShardScores) -> None:
        self.responses += len(s.effective_len)
        self.positions += len(s.rel)
        self.metric_sum += float(np.sum(s.metric_values, dtype=np.float64))
        self.kept += int(s.effective_len.sum())
        self.e.append(s.effective_len)

    def summary(self, match: dict[str, float], seconds: float) -> ScoreRound:
        e = np.concatenate(self.e) if self.e else np.zeros(0)
        n = max(self.positions, 1)
        return ScoreRound(
            self.r,
            self.responses,
            self.positions,
            self.metric_sum / n,
            self.kept / n,
            float(e.mean()) if len(e) else 0.0,
            match,
            seconds,
        )


def read_effective_lengths(run: RunDir, name: str, r: int) -> np.ndarray:
    """E of every response of round ``r`` in variant ``name`` (input of the budget controller)."""
    d = run.score_round(name, r)
    if not run.shards(d):
        raise OpdcacheError(f"{d}: no score shards; run `opdcache score {run.root} --variant {name}` first")
    files = whole_round(run, r, name)  # a sharded score still running, or one killed, is not whole
    cols = [SCORE_BY_NAME["effective_len"]]
    return np.concatenate(
        [read_score_shard(f, cols, validate=False)[0].column("effective_len").to_numpy() for f in files]
    )
