"""In-flight truncation (beyond the paper; arm ``prune-inflight``): a sample stops generating once its
reliability is spent.

Alg. 1 sizes the next round's budget from E, but inside a round every sample still runs to M_t.
Here generation runs in chunks of ``rollout.chunk_tokens``; after each chunk the teacher scores the
new positions on the same prefixes (the gathering forward), B and C are carried on with the run's
variant (eqs. 6-9), and a sample whose R reached 0 (R <= eps, eq. 12) at position tau_0 keeps
tau_0 + 1 + ``rollout.unreliable_tail`` positions and stops with finish_reason ``"unreliable"``.
The others are resubmitted as prompt + response so far (vLLM's prefix cache keeps that cheap).

Rows keep the rollout schema; the teacher stage recomputes the teacher columns as for any rollout,
and the score stage then finds E = tau_0 for every stopped sample and E = its length for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opdcache.rollout import engine
from opdcache.score import reliability as rl
from opdcache.score.stage import bad_events
from opdcache.score.variant import VariantSpec

# (prompt ids, response ids, student top-k ids, first new position) -> the teacher's top-k ids and
# log-probs at the new positions
TeacherChunk = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]

COLUMNS = ("response_ids", "student_logprob", "student_topk_ids", "student_topk_logprobs")


@dataclass
class Sample:
    """One response being generated: its arrays so far, C at its last position and where it stops."""

    prompt: np.ndarray
    arrays: dict[str, list[np.ndarray]] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    length: int = 0
    generated: int = 0  # tokens the engine decoded, those cut off after the stop included
    bad_count: int = 0  # C at the last scored position (eq. 8)
    stop_at: int | None = None  # positions kept once R reached 0: tau_0 + 1 + tail
    finish_reason: str | None = None  # None while it still generates

    def column(self, name: str) -> np.ndarray:
        return np.concatenate(self.arrays[name]) if self.arrays[name] else np.zeros(0)

    def result(self) -> tuple[dict[str, np.ndarray], str]:
        return {c: self.column(c) for c in COLUMNS}, str(self.finish_reason)


def extend(
    s: Sample,
    arrays: dict[str, np.ndarray],
    finish_reason: str,
    spec: VariantSpec,
    teacher: TeacherChunk,
    tail: int,
    max_tokens: int,
) -> None:
    """Append one chunk, score its positions, and decide whether the sample goes on."""
    start = s.length
    for c in COLUMNS:
        s.arrays[c].append(arrays[c])
    n_new = len(arrays["response_ids"])
    s.length += n_new
    s.generated += n_new
    if n_new:
        response, student_ids = s.column("response_ids"), s.column("student_topk_ids")
        t_ids, t_lps = teacher(s.prompt, response, student_ids, start)
        _, bad = bad_events(spec, response[start:], student_ids[start:], t_ids, t_lps)
        cum = s.bad_count + np.cumsum(bad, dtype=np.int64)
        s.bad_count = int(cum[-1])
        spent = np.flatnonzero(rl.reliability(cum, spec.w_drop) <= spec.eps)
        if s.stop_at is None and len(spent):
            s.stop_at = start + int(spent[0]) + 1 + tail
    if s.stop_at is not None and s.length >= s.stop_at:
        for c in COLUMNS:  # the chunk ran past the stop: drop what was decoded after it
            s.arrays[c] = [s.column(c)[: s.stop_at]]
        s.length, s.finish_reason = s.stop_at, "unreliable"
    elif finish_reason != "length" or s.length >= max_tokens:
        s.finish_reason = finish_reason


def generate_inflight(
    llm: Any,
    prompts: list[list[int]],
    n: int,
    max_tokens: int,
    k: int,
    chunk: int,
    tail: int,
    spec: VariantSpec,
    teacher: TeacherChunk,
    temperature: float = 1.0,
) -> list[list[Sample]]:
    """n samples per prompt at budget ``max_tokens``, each stopped once its R reaches 0 (+ ``tail``)."""
    samples = [[Sample(np.asarray(p, dtype=np.int32)) for _ in range(n)] for p in prompts]
    outs = engine.generate(llm, prompts, n, temperature, min(chunk, max_tokens), k)
    for row, out in zip(samples, outs, strict=True):
        for s, c in zip(row, out.outputs, strict=True):
            extend(s, engine.completion_arrays(c, k), str(c.finish_reason), spec, teacher, tail, max_tokens)
    while todo := [s for row in samples for s in row if s.finish_reason is None]:
        budgets = [min(chunk, max_tokens - s.length, (s.stop_at or max_tokens) - s.length) for s in todo]
        outs = engine.generate(
            llm,
            [np.concatenate([s.prompt, s.column("response_ids")]).tolist() for s in todo],
            1,
            temperature,
            budgets,
            k,
        )
        for s, out in zip(todo, outs, strict=True):
            c = out.outputs[0]
            extend(s, engine.completion_arrays(c, k), str(c.finish_reason), spec, teacher, tail, max_tokens)
    return samples
