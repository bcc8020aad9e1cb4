"""Trained tokens/s under DeepSpeed vs a plain torch AdamW loop, same model, batch and loss.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--batch 4] [--tokens 256] [--hidden 256]
    .venv/bin/python benchmarks/train_throughput.py --tiny   # seconds; what the test suite runs

Both loops run the OPD loss (opdcache/train/loss.py) on the same synthetic cached batch of a tiny
self-built Qwen2; DeepSpeed runs ZeRO stage ``--zero`` in one process (CPU: gloo) with torch AdamW
as the client optimizer. Prints tokens/s of each and the ratio, and the max |loss difference| of the
two runs (fp32: they should agree); then the plain loop's tokens/s with each ``train.objective``
(the trainer's forward_terms + policy_loss) against student-topk's. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="response tokens per sequence")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument(
        "--tiny", action="store_true", help="CI size: 3 steps of 2 x 16 tokens on a 1-layer model"
    )
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(steps=3, batch=2, tokens=16, hidden=64, layers=1)

    import deepspeed
    from transformers import AutoModelForCausalLM

    from opdcache.config import OBJECTIVES
    from opdcache.models.tiny import build_tiny_model
    from opdcache.train.data import Example, collate
    from opdcache.train.extensions import before_deepspeed
    from opdcache.train.loss import REST_OBJECTIVES, opd_policy_loss, policy_loss
    from opdcache.train.stage import forward_terms, sequence_logprobs, single_process_env

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "m", hidden=args.hidden, layers=args.layers, extra_tokens=2000)
        vocab = AutoModelForCausalLM.from_pretrained(path).config.vocab_size

        def example() -> Example:
            t = args.tokens
            ids = np.stack([rng.choice(vocab, args.k, replace=False) for _ in range(t)])
            old = np.log(rng.dirichlet(np.ones(args.k), size=t)).astype(np.float32) - 0.1
            t_ids = (
                np.concatenate([ids[:, : args.k // 2], ids[:, : args.k - args.k // 2] + 1], axis=1) % vocab
            )
            teacher = old + rng.normal(0, 0.5, old.shape).astype(np.float32)
            return Example(
                rng.integers(3, 60, 24),
                ids[:, 0].copy(),
                ids,
                old,
                teacher,
                np.full(t, 1.5, np.float32),
                teacher_ids=t_ids,
                teacher_topk=teacher - 0.5,
                teacher_y=teacher[:, 0].copy(),
                old_y=old[:, 0].copy(),
            )

        batches = [collate([example() for _ in range(args.batch)], pad_id=1) for _ in range(args.steps)]
        tokens = sum(int(b["mask"].sum()) for b in batches)

        def run(step_fn, model) -> tuple[float, list[float]]:
            losses = []
            step_fn(model, batches[0])  # warm-up, not timed
            t0 = time.perf_counter()
            for b in batches:
                losses.append(step_fn(model, b))
            return time.perf_counter() - t0, losses

        torch.manual_seed(0)
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        opt = torch.optim.AdamW(plain.parameters(), lr=1e-5)

        def plain_step(model, b) -> float:
            loss, _ = opd_policy_loss(
                sequence_logprobs(model, b), b["old"], b["teacher"], b["weight"], b["mask"]
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.item()

        t_plain, l_plain = run(plain_step, plain)

        def recompute(model, b) -> float:  # the old-log-prob pass the stage adds before each round's update
            with torch.no_grad():
                return float(sequence_logprobs(model, b).sum())

        t_recompute, _ = run(recompute, plain)

        before_deepspeed()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with single_process_env():
            engine, *_ = deepspeed.initialize(
                model=model,
                optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
                config={
                    "train_micro_batch_size_per_gpu": args.batch,
                    "gradient_accumulation_steps": 1,
                    "gradient_clipping": 1.0,
                    "zero_optimization": {"stage": args.zero},
                    "steps_per_print": 1 << 30,
                },
            )

        def ds_step(eng, b) -> float:
            loss, _ = opd_policy_loss(
                sequence_logprobs(eng, b), b["old"], b["teacher"], b["weight"], b["mask"]
            )
            eng.backward(loss)
            eng.step()
            return loss.item()

        t_ds, l_ds = run(ds_step, engine)
        print(
            f"model: Qwen2 hidden={args.hidden} layers={args.layers} vocab={vocab}; {args.steps} steps x "
            f"{args.batch} sequences x {args.tokens} response tokens (k={args.k}); ZeRO {args.zero}"
        )
        print(f"plain torch AdamW loop: {tokens / t_plain:8.0f} tokens/s")
        print(f"DeepSpeed engine:       {tokens / t_ds:8.0f} tokens/s")
        print(f"ratio DeepSpeed / plain: {t_plain / t_ds:7.2f}x")
        print(
            f"old-log-prob recompute:  {tokens / t_recompute:8.0f} tokens/s (no-grad forward; "
            f"adds {t_recompute / t_ds:.0%} to one epoch of DeepSpeed steps)"
        )
        print(
            f"max |loss difference| over the steps: {max(abs(a - b) for a, b in zip(l_plain, l_ds, strict=True)):.3g}"
        )

        per_objective = {}
        for objective in OBJECTIVES:
            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            o = torch.optim.AdamW(m.parameters(), lr=1e-5)

            def obj_step(model, b, objective=objective, o=o) -> float:
                terms = forward_terms(model, b, rest_grad=objective in REST_OBJECTIVES)
                loss, _ = policy_loss(objective, terms)
                o.zero_grad()
                loss.backward()
                o.step()
                return loss.item()

            per_objective[objective], _ = run(obj_step, m)
        base = per_objective["student-topk"]
        for objective, sec in per_objective.items():
            print(
                f"objective {objective:15s} {tokens / sec:8.0f} tokens/s  ({base / sec:.2f}x student-topk's)"
            )


if __name__ == "__main__":
    main()
