"""Avg@n accuracy of a checkpoint on a prompt file (vLLM sampling, answers in ``\\boxed{}``).

    opdcache eval CHECKPOINT --data FILE [--n 16] [--checker math|exact] [--out FILE]

``math`` checks answers with math-verify (symbolic equivalence, for real math data: AIME / AMC /
MATH-500 exports); ``exact`` compares the last ``\\boxed{}`` content as a string (the toy task).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from opdcache.config import DataConfig
from opdcache.errors import OpdcacheError
from opdcache.grading import Checker, is_correct
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
    n: int,
    temperature: float,
    max_tokens: int,
    checker: Checker,
    template: str,
    chat: bool,
    seed: int,
    checkpoint: str = "",
) -> EvalResult:
    """Evaluate with an engine already holding the checkpoint."""
    prompts = load_prompts(data)
    encoded = encode_prompts(tokenizer, prompts, template, chat)
    t0 = time.perf_counter()
    outs = engine.generate(llm, encoded, n, temperature, max_tokens, k=0, seed=seed)
    per_prompt, lengths, truncated = {}, [], 0
    for pr, out in zip(prompts, outs, strict=True):
        ok = [is_correct(c.text, pr.answer, checker) for c in out.outputs]
        per_prompt[pr.prompt_id] = float(np.mean(ok))
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
    )


def evaluate(
    checkpoint: str,
    data: str | Path,
    n: int = 16,
    temperature: float = 0.6,
    max_tokens: int = 4096,
    checker: Checker = "math",
    template: str = DAPO_TEMPLATE,
    chat: bool = False,
    seed: int = 0,
    kv_cache_gib: int = 2,
    enforce_eager: bool = False,
    out: str | Path | None = None,
) -> EvalResult:
    """Start an engine on ``checkpoint``, evaluate Avg@n, optionally write the result JSON."""
    from transformers import AutoTokenizer

    if n < 1 or max_tokens < 1 or temperature < 0:
        raise OpdcacheError(
            f"eval: n and max_tokens must be >= 1 and temperature >= 0 (got {n}, {max_tokens}, {temperature})"
        )
    require_checkpoint(checkpoint, "eval")
    load_prompts(data)  # fail on bad data before the engine starts
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    longest = max(len(e) for e in encode_prompts(tokenizer, load_prompts(data), template, chat))
    llm = engine.make_llm(
        checkpoint, 1, longest + max_tokens, seed, kv_cache_gib=kv_cache_gib, enforce_eager=enforce_eager
    )
    try:
        res = evaluate_with(
            llm, tokenizer, data, n, temperature, max_tokens, checker, template, chat, seed, checkpoint
        )
    finally:
        engine.shutdown(llm)
    if out is not None:
        atomic_write_bytes(Path(out), json.dumps(asdict(res), indent=1).encode())
    return res


def read_eval(path: str | Path) -> EvalResult:
    try:
        return EvalResult(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise OpdcacheError(f"{path}: not an opdcache eval result ({e})") from e
