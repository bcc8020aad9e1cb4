"""How often a sample changes with the batch it shares, under per-request seeds (issue 31).

    .venv/bin/python benchmarks/repeat_flips.py --model M [--prompts 32] [--n 4] [--tokens 96]
    .venv/bin/python benchmarks/repeat_flips.py --tiny   # what the test suite runs (self-built model)

Each prompt's samples draw from their own seed (`engine.request_seed`), so the random stream does
not depend on the batch; what still can is the arithmetic (a batched matmul sums in another order
than a single row's), and one flipped log-prob near a tie changes the token and everything after
it. The embedded arithmetic prompts (chat template when the tokenizer has one) are sampled four
ways: all in one batch, the batch reversed, each prompt alone, and all in one batch on a second,
fresh engine. Prints, for each way against the first, the share of responses identical token for
token and the position of the first difference where one differs. Figures only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint to sample from (default: a self-built tiny model)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--tokens", type=int, default=96, help="max tokens per response")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--tiny", action="store_true", help="CI size: tiny model, 4 prompts x 2 samples x 16")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from opdcache.arithmetic import prompt_ids, sample_arithmetic
    from opdcache.prompts import Prompt, encode_prompts
    from opdcache.rollout import engine

    tmp = tempfile.TemporaryDirectory()
    model = a.model
    if a.tiny:
        from opdcache.models.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tmp.name) / "m", seed=3, embedding_scale=1.5))
        a.prompts, a.n, a.tokens = 4, 2, 16
    if not model:
        ap.error("--model or --tiny")
    tok = AutoTokenizer.from_pretrained(model)
    problems = sample_arithmetic(a.prompts, seed=0)
    prompts = [
        Prompt(i, p.question, str(p.answer)) for i, p in zip(prompt_ids(problems), problems, strict=True)
    ]
    encoded = encode_prompts(tok, prompts, "{question}", bool(getattr(tok, "chat_template", None)))
    seeds = [engine.request_seed(a.n, 0, 0, p.prompt_id) for p in prompts]
    longest = max(map(len, encoded)) + a.tokens

    def sample(llm, order: list[int]) -> dict[int, list[list[int]]]:
        outs = engine.generate(
            llm, [encoded[i] for i in order], a.n, a.temperature, a.tokens, 0, seeds=[seeds[i] for i in order]
        )
        return {i: [list(c.token_ids) for c in out.outputs] for i, out in zip(order, outs, strict=True)}

    everyone = list(range(len(prompts)))
    llm = engine.make_llm(model, 1, longest, 0, dtype="float32", kv_cache_gib=1)
    ways = {"batch": sample(llm, everyone), "reversed": sample(llm, everyone[::-1])}
    ways["alone"] = {i: sample(llm, [i])[i] for i in everyone}
    engine.shutdown(llm)
    llm = engine.make_llm(model, 1, longest, 0, dtype="float32", kv_cache_gib=1)
    ways["fresh engine"] = sample(llm, everyone)
    engine.shutdown(llm)

    base = ways["batch"]
    total = len(prompts) * a.n
    lengths = [len(t) for samples in base.values() for t in samples]
    print(f"model {model}: {len(prompts)} prompts x {a.n} samples, <= {a.tokens} tokens, T = {a.temperature}")
    print(f"mean response length: {statistics.mean(lengths):.1f} tokens")
    for way, got in list(ways.items())[1:]:
        diffs = [first_difference(x, y) for i in everyone for x, y in zip(base[i], got[i], strict=True)]
        flipped = [d for d in diffs if d is not None]
        where = (
            f"first difference at token median {statistics.median(flipped):.0f} (min {min(flipped)})"
            if flipped
            else "no difference"
        )
        print(
            f"{way} vs batch: responses identical {1 - len(flipped) / total:.3f} ({total - len(flipped)}/{total}); {where}"
        )


if __name__ == "__main__":
    main()
