"""In-flight truncation's rollout against the plain rollout + teacher stage, on the same engine,
teacher, prompts and budget (issue 25).

    .venv/bin/python benchmarks/inflight_rollout.py --student S --teacher T [--budget 320] [--reps 3]
    .venv/bin/python benchmarks/inflight_rollout.py --tiny   # what the test suite runs (self-built models)

One vLLM engine and one teacher serve every repetition; each repetition runs the plain arm (rollout,
then the teacher stage) and the in-flight arm (rollout with the teacher scoring as samples grow) into
fresh run directories, alternating. Prints the seconds of each, their ratio, the teacher positions
computed per position kept and the tokens decoded per position kept. Figures only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="student checkpoint (default: self-built tiny model)")
    ap.add_argument("--teacher", help="teacher checkpoint (default: self-built tiny model)")
    ap.add_argument("--data", help="prompt file (default: generated sums)")
    ap.add_argument("--template", default="{question}", help="data.template")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--budget", type=int, default=320, help="M_t of the round")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument(
        "--w-drop", type=float, default=0.01, help="score.w_drop (R = 0 after 1 / w_drop bad events)"
    )
    ap.add_argument("--chunk", type=int, default=None, help="rollout.chunk_tokens (default: the config's)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--tiny", action="store_true", help="CI size: tiny models, 2 prompts x 2 samples x 24 tokens"
    )
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(prompts=2, n=2, budget=24, k=8, w_drop=0.1, reps=1)

    from opdcache.config import load_config, write_run_config
    from opdcache.models.tiny import build_tiny_model
    from opdcache.rollout import engine
    from opdcache.rollout.stage import engine_settings, rollout_round
    from opdcache.rundir import RunDir
    from opdcache.teacher.stage import ResidentTeacher, teacher_round

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student = args.student or str(build_tiny_model(tmp / "student", seed=1))
        teacher = args.teacher or str(build_tiny_model(tmp / "teacher", seed=2))
        prompts = Path(args.data) if args.data else tmp / "prompts.jsonl"
        if not args.data:
            prompts.write_text(
                "".join(
                    json.dumps(
                        {"prompt_id": f"q{i}", "question": f"{i} + {i + 3} = ?", "answer": str(2 * i + 3)}
                    )
                    + "\n"
                    for i in range(args.prompts)
                )
            )
        base = [
            f"models.student={student}",
            f"models.teacher={teacher}",
            f"data.prompts={prompts}",
            f"data.template={args.template!r}",
            f"rollout.k={args.k}",
            f"rollout.n_samples={args.n}",
            f"rollout.prompts_per_round={args.prompts}",
            f"rollout.part_size={max(1, args.prompts // 2)}",
            f"rollout.temperature={args.temperature}",
            "rollout.kv_cache_gib=1",
            f"score.w_drop={args.w_drop}",
            f"budget.max={args.budget}",
            f"budget.initial={args.budget}",
            f"budget.min={args.budget}",
            *([f"rollout.chunk_tokens={args.chunk}"] if args.chunk else []),
        ]
        cfgs = {arm: load_config(None, [*base, f"arm.name={arm}"]) for arm in ("prune", "prune-inflight")}
        times: dict[str, list[float]] = {"prune": [], "prune-inflight": []}
        ratios: dict[str, list[float]] = {"teacher/kept": [], "decoded/kept": []}
        resident = ResidentTeacher()
        with engine.PersistentEngine(**engine_settings(cfgs["prune"])) as engines:
            engines.min_len = 512 + args.budget
            resident.get(cfgs["prune"])
            for rep in range(args.reps + 1):  # repetition 0 warms the engine and the teacher up
                for arm, cfg in cfgs.items():
                    run = RunDir(tmp / f"{arm}-{rep}")
                    run.root.mkdir()
                    write_run_config(run, cfg)
                    t0 = time.perf_counter()
                    ro = rollout_round(run, 0, cfg, args.budget, False, engines, resident)
                    te = teacher_round(run, 0, cfg, False, resident)
                    seconds = time.perf_counter() - t0
                    if rep:
                        times[arm].append(seconds)
                        if arm == "prune-inflight":
                            ratios["teacher/kept"].append((ro.teacher_positions + te.tokens) / ro.tokens)
                            ratios["decoded/kept"].append(ro.generated_tokens / ro.tokens)
                    print(
                        f"rep {rep} {arm:15s} {seconds:6.2f} s  kept {ro.tokens:6d}  decoded {ro.generated_tokens:6d}"
                        f"  teacher positions {ro.teacher_positions + te.tokens:6d}"
                        + ("  (warm-up)" if not rep else ""),
                        flush=True,
                    )
    med = {arm: statistics.median(v) for arm, v in times.items()}
    print(f"plain rollout + teacher stage: median {med['prune']:.2f} s over {args.reps}")
    print(f"in-flight rollout: median {med['prune-inflight']:.2f} s over {args.reps}")
    print(f"ratio in flight / plain: {med['prune-inflight'] / med['prune']:.2f}")
    for name, v in ratios.items():
        print(f"{name} (in flight): {statistics.median(v):.3f}")


if __name__ == "__main__":
    main()
