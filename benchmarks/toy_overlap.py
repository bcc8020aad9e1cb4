"""Top-k overlap by depth for the toy pairs, for several k (the measurement behind the toy's k=16).

    python benchmarks/toy_overlap.py [--models demo/models] [--prompts 24] [--k 4 8 16]
    python benchmarks/toy_overlap.py --tiny --models DIR   # smoke models; what the test suite runs

Samples each student at T=1 (transformers, no vLLM needed), runs student and teacher on the same
prefixes, and prints mean overlap |TopK_S ∩ TopK_T| / k and the bad-event rate [O < 0.7] per depth
band. Builds the toy models first if the directory lacks them (~5-6 min on 2 cores).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdcache.toy.models import build_toy_models
from opdcache.toy.task import sample_problems

BANDS = [(0, 64), (64, 128), (128, 256), (256, 512), (512, 768)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo/models")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--gamma", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=768)
    ap.add_argument(
        "--smoke", action="store_true", help="the smoke-size toy models (`opdcache demo --smoke`)"
    )
    ap.add_argument("--tiny", action="store_true", help="CI size: smoke models, 2 prompts, 48 tokens, k=16")
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(smoke=True, prompts=2, max_new_tokens=48, k=[16])
    torch.manual_seed(0)
    paths = build_toy_models(args.models, smoke=args.smoke, progress=False)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    print(f"{'pair':6} {'k':>3} " + " ".join(f"{f'{lo}-{hi}':>13}" for lo, hi in BANDS) + "   (overlap/bad)")
    for pair, name in (("high", "student_high"), ("low", "student_low")):
        student = AutoModelForCausalLM.from_pretrained(paths[name])
        tok = AutoTokenizer.from_pretrained(paths[name])
        tok.padding_side = "left"
        probs = sample_problems(args.prompts, seed=7)
        enc = tok([p.question for p in probs], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            seq = student.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            p0 = enc.input_ids.shape[1]
            att = (seq != tok.pad_token_id).long()
            ls = student(seq, attention_mask=att).logits[:, p0 - 1 : -1]
            lt = teacher(seq, attention_mask=att).logits[:, p0 - 1 : -1]
        valid = seq[:, p0:] != tok.pad_token_id
        for k in args.k:
            a, b = ls.topk(k, -1).indices, lt.topk(k, -1).indices
            ov = (a[..., :, None] == b[..., None, :]).any(-1).float().mean(-1)
            cells = []
            for lo, hi in BANDS:
                m = valid[:, lo:hi]
                o = ov[:, lo:hi][m]
                cells.append(f"{o.mean():.2f}/{(o < args.gamma).float().mean():.2f}" if m.any() else "-")
            print(f"{pair:6} {k:>3} " + " ".join(f"{c:>13}" for c in cells))
        print(f"{pair:6} mean response length {valid.sum(1).float().mean():.0f} tokens")


if __name__ == "__main__":
    main()
