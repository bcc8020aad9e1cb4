"""Avg@n accuracy of a checkpoint on a prompt file (vLLM sampling, answers in ``\\boxed{}``).

    opdcache eval CHECKPOINT --data FILE [--n 16] [--checker math|exact] [--out FILE]

``math`` checks answers with math-verify (symbolic equivalence, for real math data: AIME / AMC /
MATH-500 exports); ``exact`` compares the last ``\\boxed{}`` content as a string (the toy task).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from opdcache.config import DataConfig
from opdcache.errors import OpdcacheError
from opdcache.grading import Checker, grader
from opdcache.models.checkpoint import require_checkpoint
from opdcache.results import EvalResult
from opdcache.rollout import engine
from opdcache.rollout.prompts import encode_prompts, load_prompts
from opdcache.rundir import atomic_write_bytes

DAPO_TEMPLATE = DataConfig.template


def evaluate_with(
    llm: Any,
    tokenizer: Any,
    data: str | Path,
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    checker: Checker,
    template: str,
    chat: bool,
    fields: Mapping[str, str] | None = None,
    checkpoint: str = "",
) -> EvalResult:
    """Evaluate with an engine already holding the checkpoint."""
    prompts = load_prompts(data, fields, quiet=True)
    encoded = encode_prompts(tokenizer, prompts, template, chat)
    t0 = time.perf_counter()
    outs = engine.generate(llm, encoded, n, temperature, max_tokens, k=0, top_p=top_p)  # seed: the engine
    per_prompt, lengths, truncated = {}, [], 0
    for pr, out in zip(prompts, outs, strict=True):
        correct = grader(pr.answer, checker)
        per_prompt[pr.prompt_id] = float(np.mean([correct(c.text) for c in out.outputs]))
        lengths += [len(c.token_ids) for c in out.outputs]
        truncated += sum(c.finish_reason == "length" for c in out.outputs)
    acc = np.array(list(per_prompt.values()))
    return EvalResult(
        checkpoint,
        str(data),
        n,
        temperature,
        max_tokens,
        checker,
        len(prompts),
        float(acc.mean()),
        float((acc > 0).mean()),
        float(np.mean(lengths)),
        truncated / len(lengths),
        time.perf_counter() - t0,
        per_prompt,
        top_p=top_p,
    )


def evaluate(
    checkpoint: str,
    data: str | Path,
    *,
    n: int = 16,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_tokens: int = 0,
    checker: Checker = "math",
    template: str = DAPO_TEMPLATE,
    chat: bool = False,
    fields: Mapping[str, str] | None = None,
    seed: int = 0,
    kv_cache_gib: int = 2,
    enforce_eager: bool | str = "auto",
    out: str | Path | None = None,
    engines: engine.PersistentEngine | None = None,
    k: int = 1,
) -> EvalResult:
    """Evaluate Avg@n of ``checkpoint``, optionally writing the result JSON.

    The reference protocol is the default: Avg@16 at temperature 1.0, top-p 0.95, and a long budget
    (``max_tokens`` 0: as many tokens as the model's context leaves after the longest prompt).
    ``engines`` (``opdcache run``) is an engine kept across stages (asked for ``k`` log-probs, so the
    rollout can use it too); without it an engine is started and shut down here.
    """
    from transformers import AutoTokenizer

    if n < 1 or max_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise OpdcacheError(
            f"eval: need n >= 1, max_tokens >= 0, temperature >= 0, 0 < top_p <= 1 "
            f"(got {n}, {max_tokens}, {temperature}, {top_p})"
        )
    longest, max_tokens = eval_context(checkpoint, data, max_tokens, template, chat, fields)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    own = engines is None
    if own:
        engines = engine.PersistentEngine(kv_cache_gib=kv_cache_gib, enforce_eager=enforce_eager)
    try:
        llm, startup = engines.get(checkpoint, k, longest + max_tokens, seed)
        res = evaluate_with(
            llm,
            tokenizer,
            data,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            checker=checker,
            template=template,
            chat=chat,
            fields=fields,
            checkpoint=checkpoint,
        )
    finally:
        engines.close() if own else engines.release()
    res = dataclasses.replace(res, startup_seconds=startup)
    if out is not None:
        write_eval(res, out)
    return res


def eval_context(
    checkpoint: str,
    data: str | Path,
    max_tokens: int,
    template: str,
    chat: bool,
    fields: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """(longest prompt in tokens, max_tokens resolved): 0 means what the model's context leaves."""
    from transformers import AutoConfig, AutoTokenizer

    require_checkpoint(checkpoint, "eval")
    ps = load_prompts(data, fields)  # fail on bad data before any engine starts
    longest = max(
        len(e) for e in encode_prompts(AutoTokenizer.from_pretrained(checkpoint), ps, template, chat)
    )
    context = getattr(AutoConfig.from_pretrained(checkpoint), "max_position_embeddings", None) or 1 << 30
    max_tokens = max_tokens or context - longest
    if longest + max_tokens > context:
        raise OpdcacheError(
            f"eval: longest prompt ({longest} tokens) + max_tokens {max_tokens} exceed the context of "
            f"{checkpoint} ({context}); lower max_tokens"
        )
    return longest, max_tokens


def write_eval(res: EvalResult, out: str | Path) -> None:
    atomic_write_bytes(Path(out), json.dumps(asdict(res), indent=1).encode())


def read_eval(path: str | Path) -> EvalResult:
    try:
        return EvalResult(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise OpdcacheError(f"{path}: not an opdcache eval result ({e})") from e
