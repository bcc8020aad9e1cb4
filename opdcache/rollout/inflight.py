"""In-flight truncation (beyond the paper; arm ``prune-inflight``): a sample stops generating once its
reliability is spent.

Alg. 1 sizes the next round's budget from E, but inside a round every sample still runs to M_t.
Here each sample is one vLLM request, generated once: the engine streams its new tokens every step
(``engine.submit_streaming``), the teacher scores them on the same prefixes with its KV cache kept
between chunks (``teacher.forward.GrowingResponse``: each position goes through the teacher once),
B and C are carried on with the run's variant (eqs. 6-9), and a sample whose R reached 0 (R <= eps,
eq. 12) at position tau_0 keeps tau_0 + 1 + ``rollout.unreliable_tail`` positions, is aborted in the
engine and ends with finish_reason ``"unreliable"``.

A sample is scored once it holds min(``rollout.chunk_tokens``, the bad events still needed for R = 0)
unscored positions, so a stop can only fall on the last position of a scored chunk: no position past
tau_0 + 1 + tail goes through the teacher. The rows are complete cache rows (teacher columns
included); the score stage finds E = tau_0 for every stopped sample and E = its length for the others.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opdcache.rollout import engine
from opdcache.score import reliability as rl
from opdcache.score.stage import bad_events
from opdcache.teacher.forward import GrowingResponse
from opdcache.variant import VariantSpec

STUDENT = ("response_ids", "student_logprob", "student_topk_ids", "student_topk_logprobs")
TEACHER = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_logprob", "teacher_logprob_on_student_topk")


@dataclass
class Sample:
    """One response being generated: what the engine streamed, what the teacher scored, C at the last
    scored position and where the sample stops."""

    teacher: GrowingResponse
    arrays: dict[str, list[np.ndarray]] = field(default_factory=lambda: {c: [] for c in STUDENT + TEACHER})
    length: int = 0  # positions streamed (before a stop's cut)
    scored: int = 0  # positions the teacher has scored
    bad_count: int = 0  # C at the last scored position (eq. 8)
    stop_at: int | None = None  # positions kept once R reached 0: tau_0 + 1 + tail
    finish_reason: str | None = None  # None while it still generates

    def column(self, name: str) -> np.ndarray:
        return np.concatenate(self.arrays[name]) if self.arrays[name] else np.zeros(0)

    def result(self) -> tuple[dict[str, np.ndarray], str]:
        return {c: self.column(c) for c in STUDENT + TEACHER}, str(self.finish_reason)


def advance(
    s: Sample,
    new: dict[str, np.ndarray],
    engine_reason: str | None,
    spec: VariantSpec,
    chunk: int,
    tail: int,
    to_zero: int | None,
) -> None:
    """Append the engine's new positions, score those due, and decide whether the sample is done.

    ``engine_reason``: the engine ended the request ("stop" / "length"); ``to_zero``: the bad-event
    count at which R reaches 0 (``rl.events_to_zero``; None: never).
    """
    for c in STUDENT:
        s.arrays[c].append(new[c])
    s.length += len(new["response_ids"])
    while True:
        upto = s.length if s.stop_at is None else min(s.length, s.stop_at)
        if s.stop_at is not None:
            due = s.stop_at - s.scored
        else:
            due = chunk if to_zero is None else min(chunk, to_zero - s.bad_count)
        n = min(upto - s.scored, due)
        if n <= 0 or (n < due and engine_reason is None):
            break
        _score(s, n, spec, tail, to_zero)
    if s.stop_at is not None and s.scored >= s.stop_at:
        for c in s.arrays:  # positions streamed past the stop are dropped
            s.arrays[c] = [s.column(c)[: s.stop_at]]
        s.length, s.finish_reason = s.stop_at, "unreliable"
    elif engine_reason is not None:
        s.finish_reason = engine_reason


def _score(s: Sample, n: int, spec: VariantSpec, tail: int, to_zero: int | None) -> None:
    """The teacher on positions scored .. scored + n - 1; B and C carried on (eqs. 6-9)."""
    a, b = s.scored, s.scored + n
    response, student_ids = s.column("response_ids")[a:b], s.column("student_topk_ids")[a:b]
    o = s.teacher.extend(response, student_ids)
    for c, v in zip(
        TEACHER, (o.topk_ids, o.topk_logprobs, o.sampled_logprob, o.on_student_topk), strict=True
    ):
        s.arrays[c].append(v)
    _, bad = bad_events(spec, response, student_ids, o.topk_ids, o.topk_logprobs)
    cum = s.bad_count + np.cumsum(bad, dtype=np.int64)
    s.scored, s.bad_count = b, int(cum[-1])
    if s.stop_at is None and to_zero is not None:
        spent = np.flatnonzero(rl.reliability(cum, spec.w_drop) <= spec.eps)
        if len(spent):
            s.stop_at = a + int(spent[0]) + 1 + tail


def generate_inflight(
    llm: Any,
    prompts: list[list[int]],
    n: int,
    max_tokens: int,
    k: int,
    chunk: int,
    tail: int,
    spec: VariantSpec,
    teacher: Callable[[np.ndarray], GrowingResponse],
    temperature: float = 1.0,
    seeds: list[int] | None = None,
) -> tuple[list[list[Sample]], int]:
    """n samples per prompt at budget ``max_tokens``, each stopped once its R reaches 0 (+ ``tail``);
    ``teacher(prompt ids)`` starts the teacher on a prompt (forked for its n samples). Also returns
    the tokens the engine decoded (those streamed past a stop included). ``seeds``: one per prompt, as
    in ``engine.generate`` (the same samples as a plain rollout with those seeds, up to each stop)."""
    import torch

    to_zero = rl.events_to_zero(spec.w_drop, spec.eps)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():  # on CPU the engine's worker holds a core: the teacher takes one thread
        torch.set_num_threads(1)
    ids = engine.submit_streaming(llm, prompts, n, temperature, max_tokens, k, uuid.uuid4().hex[:12], seeds)
    all_ids = [rid for row in ids for rid in row]
    generated, finished = 0, set()
    try:
        samples = []  # the prompts' teacher forwards run while the engine starts decoding
        for p in prompts:
            t = teacher(np.asarray(p, dtype=np.int64))
            samples.append([Sample(t.fork() if j < n - 1 else t) for j in range(n)])
        by_id = dict(zip(all_ids, (s for row in samples for s in row), strict=True))
        while len(finished) < len(by_id):
            stopped = []
            for out in engine.step(llm):
                s = by_id.get(out.request_id)
                if s is None or out.request_id in finished:
                    continue  # streamed before its abort took effect
                c = out.outputs[0]
                new = engine.completion_arrays(c, k)
                generated += len(new["response_ids"])
                advance(s, new, str(c.finish_reason) if out.finished else None, spec, chunk, tail, to_zero)
                if s.finish_reason is not None:
                    finished.add(out.request_id)
                    if not out.finished:
                        stopped.append(out.request_id)
            engine.abort(llm, stopped)
    except BaseException:
        engine.abort(llm, [rid for rid in all_ids if rid not in finished])
        raise
    finally:
        torch.set_num_threads(threads)
    return samples, generated
