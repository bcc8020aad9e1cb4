"""Rollout and teacher-scoring throughput on a self-built checkpoint (no downloads).

    .venv/bin/python benchmarks/rollout_throughput.py [--prompts 16] [--n 4] [--tokens 256] [--hidden 256]
    .venv/bin/python benchmarks/rollout_throughput.py --tiny   # what the test suite runs

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
    ap.add_argument("--tiny", action="store_true", help="CI size: 2 prompts x 2 samples x 16 tokens")
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(prompts=2, n=2, tokens=16, hidden=64, layers=1, vocab_extra=200)

    from transformers import AutoModelForCausalLM

    from opdcache.models.tiny import build_tiny_model
    from opdcache.rollout import engine
    from opdcache.teacher.forward import score_response

    torch.set_num_threads(1)  # one thread beside vLLM's own (measured faster on 2-core VMs)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(
            Path(tmp) / "m", seed=0, hidden=args.hidden, layers=args.layers, extra_tokens=args.vocab_extra
        )
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 60, size=24).tolist() for _ in range(args.prompts)]
        total = args.prompts * args.n * args.tokens
        print(
            f"checkpoint: Qwen2 hidden={args.hidden} layers={args.layers}; batch {args.prompts} prompts x "
            f"{args.n} samples x {args.tokens} tokens = {total} tokens; k={args.k}"
        )

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        llm = engine.make_llm(str(path), args.k, max_model_len=64 + args.tokens, seed=0, kv_cache_gib=1)
        startup = time.perf_counter() - t0
        sp = SamplingParams(
            n=args.n,
            temperature=1.0,
            max_tokens=args.tokens,
            min_tokens=args.tokens,
            ignore_eos=True,
            logprobs=args.k,
            seed=0,
        )
        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        llm.generate(reqs[:1], sp, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(reqs, sp, use_tqdm=False)
        t_vllm = time.perf_counter() - t0
        arrays = [engine.completion_arrays(c, args.k) for o in outs for c in o.outputs]
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
        for p, a in zip([p for p in prompts for _ in range(args.n)], arrays, strict=True):
            score_response(
                model,
                np.array(p),
                a["response_ids"],
                a["student_topk_ids"],
                args.k,
                vocab=model.config.vocab_size,
            )
        t_teacher = time.perf_counter() - t0

        print(f"vLLM start-up:               {startup:8.1f} s")
        print(f"vLLM generate:               {total / t_vllm:8.0f} tokens/s")
        print(f"transformers generate:       {total / t_hf:8.0f} tokens/s")
        print(f"ratio vLLM / transformers:   {t_hf / t_vllm:8.2f}x")
        print(f"teacher gathering forward:   {total / t_teacher:8.0f} positions/s (one sequence at a time)")
        print(
            f"(torch threads {torch.get_num_threads()}, VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')})"
        )


if __name__ == "__main__":
    main()
