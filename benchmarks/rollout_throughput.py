"""Rollout and teacher-scoring throughput on a self-built checkpoint (no downloads).

    .venv/bin/python benchmarks/rollout_throughput.py [--prompts 16] [--n 4] [--tokens 256] [--hidden 256]
    .venv/bin/python benchmarks/rollout_throughput.py --tiny   # what the test suite runs
    .venv/bin/python benchmarks/rollout_throughput.py --model models/smollm2-135m   # a real vocabulary

Prints generated tokens/s of vLLM (the rollout engine, with k log-probs per position) and of
transformers ``generate`` (with per-step scores) on the same checkpoint, prompts and lengths (EOS
ignored so both produce exactly ``--tokens`` per sequence), their ratio, vLLM's start-up time, and
the teacher stage's gathering forward in positions/s. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--tokens", type=int, default=256, help="generated tokens per sample")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab-extra", type=int, default=2000, help="extra word tokens (vocabulary size)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument(
        "--model",
        help="an HF checkpoint to use instead of a self-built tiny Qwen2 (e.g. from opdcache convert)",
    )
    ap.add_argument("--eager", choices=["auto", "true", "false"], default="auto", help="vLLM enforce_eager")
    ap.add_argument("--tiny", action="store_true", help="CI size: 2 prompts x 2 samples x 16 tokens")
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(prompts=2, n=2, tokens=16, hidden=64, layers=1, vocab_extra=200)

    from transformers import AutoConfig, AutoModelForCausalLM

    from opdcache.cache.schema import CACHE_COLUMNS, CacheMeta
    from opdcache.cache.shards import write_cache_shard
    from opdcache.models.tiny import build_tiny_model
    from opdcache.rollout import engine
    from opdcache.teacher.forward import score_response

    torch.set_num_threads(1)  # one thread beside vLLM's own (measured faster on 2-core VMs)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = Path(args.model)
            name = f"{path.name} ({AutoConfig.from_pretrained(path).model_type})"
        else:
            path = build_tiny_model(
                Path(tmp) / "m", seed=0, hidden=args.hidden, layers=args.layers, extra_tokens=args.vocab_extra
            )
            name = f"Qwen2 hidden={args.hidden} layers={args.layers}"
        vocab = AutoConfig.from_pretrained(path).vocab_size
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 60, size=24).tolist() for _ in range(args.prompts)]
        total = args.prompts * args.n * args.tokens
        print(
            f"checkpoint: {name}, vocabulary {vocab}; batch {args.prompts} prompts x "
            f"{args.n} samples x {args.tokens} tokens = {total} tokens; k={args.k}"
        )

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        eager = {"true": True, "false": False}.get(args.eager, "auto")
        llm = engine.make_llm(
            str(path), args.k, max_model_len=64 + args.tokens, seed=0, kv_cache_gib=1, enforce_eager=eager
        )
        startup = time.perf_counter() - t0

        def params(flat: bool) -> SamplingParams:
            return SamplingParams(
                n=args.n,
                temperature=1.0,
                max_tokens=args.tokens,
                min_tokens=args.tokens,
                ignore_eos=True,
                logprobs=args.k,
                flat_logprobs=flat,
            )

        sp = params(True)
        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        llm.generate(reqs[:1], sp, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(reqs, sp, use_tqdm=False)
        t_vllm = time.perf_counter() - t0
        t0 = time.perf_counter()
        arrays = [engine.completion_arrays(c, args.k) for o in outs for c in o.outputs]
        t_flat = time.perf_counter() - t0
        # the same conversion from vLLM's default list of {token id: Logprob} dicts (before this change)
        dict_outs = llm.generate(reqs, params(False), use_tqdm=False)
        t0 = time.perf_counter()
        for o in dict_outs:
            for c in o.outputs:
                engine.completion_arrays(c, args.k)
        t_dict = time.perf_counter() - t0
        engine.shutdown(llm)
        del llm

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        batch = torch.tensor(prompts).repeat_interleave(args.n, dim=0)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=1,
            )
        t_hf = time.perf_counter() - t0

        t0 = time.perf_counter()
        flat_prompts = [p for p in prompts for _ in range(args.n)]
        cols: dict[str, list] = {c.name: [] for c in CACHE_COLUMNS}
        for i, (p, a) in enumerate(zip(flat_prompts, arrays, strict=True)):
            o = score_response(
                model, np.array(p), a["response_ids"], a["student_topk_ids"], args.k, vocab=vocab
            )
            row = {
                "prompt_id": str(i // args.n),
                "sample": i % args.n,
                "prompt_ids": np.array(p, np.int32),
                "finish_reason": "length",
                "max_tokens": args.tokens,
                **{k: v.reshape(-1) for k, v in a.items()},
                "teacher_topk_ids": o.topk_ids.reshape(-1),
                "teacher_topk_logprobs": o.topk_logprobs.reshape(-1),
                "teacher_logprob": o.sampled_logprob,
                "teacher_logprob_on_student_topk": o.on_student_topk.reshape(-1),
            }
            for name_, v in row.items():
                cols[name_].append(v)
        t_teacher = time.perf_counter() - t0
        part = Path(tmp) / "round=0" / "part-00000.parquet"
        meta = CacheMeta(k=args.k, student_model=str(path), teacher_model=str(path))
        positions = write_cache_shard(part, cols, meta)

        print(f"vLLM start-up:               {startup:8.1f} s")
        print(f"vLLM generate:               {total / t_vllm:8.0f} tokens/s")
        print(f"transformers generate:       {total / t_hf:8.0f} tokens/s")
        print(f"ratio vLLM / transformers:   {t_hf / t_vllm:8.2f}x")
        print(f"teacher gathering forward:   {total / t_teacher:8.0f} positions/s (one sequence at a time)")
        print(
            f"log-prob conversion, flat:   {total / t_flat:8.0f} positions/s (flat_logprobs, array reshapes)"
        )
        print(f"log-prob conversion, dicts:  {total / t_dict:8.0f} positions/s (a dict per position)")
        print(f"ratio flat / dicts:          {t_dict / t_flat:8.1f}x")
        print(f"cache bytes/position:        {part.stat().st_size / positions:8.1f} (these responses, zstd)")
        print(
            f"(torch threads {torch.get_num_threads()}, VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')})"
        )


if __name__ == "__main__":
    main()
