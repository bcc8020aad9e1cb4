"""opdcache beside TRL's DistillationTrainer on one pair, prompts and budget (issue 41).

    python benchmarks/vs_trl.py [--out vs-trl] [--seeds 0 1 2] [--task arithmetic|chain] [--tiny]
                                [--trl-vllm]

1. opdcache: ``opdcache demo --real`` with the arms OPD (sum-and-sample, fixed budget) and Prune-OPD
   (gamma 0.7) on the task's default pair (arithmetic: ``mild``, layer 14 removed; chain: ``two``):
   vLLM rollouts, the gathering teacher forward into the cache, DeepSpeed.
2. TRL 1.16 ``DistillationTrainer`` (beta = 1: full-vocabulary reverse KL, always on-policy, the teacher's
   logits computed live each step) on the same student and teacher checkpoints, the same training prompts
   (each OPD run's, round by round, read from its cache), samples per prompt (each prompt repeated, TRL
   draws one completion a row), completion budget (OPD's M_max), temperature 1, learning rate, AdamW
   (constant lr, no warmup, weight decay 0, gradient clip 1.0, as opdcache's), optimizer steps and
   responses per step, and seed. Generation: transformers ``generate`` (``--trl-vllm``: vLLM colocate).
   fp32 and no gradient checkpointing (TRL's defaults bf16 and checkpointing are GPU choices; opdcache
   trains fp32 here too).
3. Every final checkpoint is graded by opdcache's own evaluation (the runs' eval settings: greedy
   accuracy on the probe set, full-vocabulary KL and teacher NLL of the samples).
4. Prints wall time per phase (generation, teacher, training) and the ratios, the bytes of teacher data
   each keeps (opdcache's cache; TRL keeps none) and what a re-run costs (opdcache: ``replay`` of one OPD
   run from its cache, scores and training only; TRL: everything again). Writes OUT/vs_trl.md and .json.

Wall times leave out model loading and evaluation on both sides (opdcache: the runs' ``stage_walls``
charged to training; TRL: ``trainer.train()``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

TASK_PAIR = {"arithmetic": "mild", "chain": "two"}
ARMS = ("opd", "prune")


def opdcache_side(
    out: Path, seeds: tuple[int, ...], task: str, tiny: bool, arms: tuple[str, ...] = ARMS
) -> dict[str, Any]:
    from opdcache.demos.real import run_real_demo
    from opdcache.query import run_sql

    res = run_real_demo(
        out=out,
        smoke=tiny,
        seeds=seeds,
        pairs=(TASK_PAIR[task],),
        arms=arms,
        task_name=task,
        progress=not tiny,
    )
    for row in res["rows"]:
        root = out / "runs" / row["run"]
        phases = dict(
            run_sql(root, "SELECT stage, sum(train_seconds) FROM stage_walls GROUP BY stage").fetchall()
        )
        row["root"] = str(root)
        row["phases"] = {
            "generation": phases.get("rollout", 0.0),
            "teacher": phases.get("teacher", 0.0),
            "training": phases.get("train", 0.0),
            "other": sum(v for k, v in phases.items() if k not in ("rollout", "teacher", "train")),
        }
        row["teacher_bytes"] = sum(p.stat().st_size for p in (root / "cache").rglob("*") if p.is_file())
    return res


def round_prompts(root: Path) -> list[list[str]]:
    """The prompt ids each round of a run trained on, in the order the cache holds them."""
    from opdcache.query import run_sql

    rows = run_sql(
        root, "SELECT round, prompt_id, min(sample) FROM rollouts GROUP BY ALL ORDER BY round, prompt_id"
    ).fetchall()
    out: dict[int, list[str]] = {}
    for r, pid, _ in rows:
        out.setdefault(r, []).append(pid)
    return [out[r] for r in sorted(out)]


def trl_side(root: Path, out: Path, seed: int, use_vllm: bool) -> dict[str, Any]:
    """TRL's DistillationTrainer with the OPD run ``root``'s student, teacher, prompts and sizes."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    from opdcache.config import read_run_config
    from opdcache.evaluation import evaluate
    from opdcache.prompts import encode_prompts, load_prompts, render
    from opdcache.rundir import RunDir

    cfg = read_run_config(RunDir(root))
    prompts = {p.prompt_id: p for p in load_prompts(cfg.data.prompts, quiet=True)}
    rounds = round_prompts(root)
    n, per_round = cfg.rollout.n_samples, cfg.rollout.prompts_per_round
    mini = cfg.train.mini_batch_responses or n * per_round
    micro = min(cfg.train.micro_batch_size, mini)
    if mini % micro or mini % n:
        raise SystemExit(
            f"{root}: {mini} responses a step must be whole prompts and micro-batches of {micro}"
        )
    steps = (n * per_round) // mini
    order = [
        pid for ids in rounds for pid in ids for _ in range(n)
    ]  # each prompt n times, whole prompts a step
    chat = cfg.data.chat_template

    def prompt_of(pid: str) -> Any:
        text = render(prompts[pid].question, cfg.data.template)
        return [{"role": "user", "content": text}] if chat else text

    tok = AutoTokenizer.from_pretrained(cfg.models.student)
    student = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.models.teacher, dtype=torch.float32)
    args = DistillationConfig(
        output_dir=str(out / "trainer"),
        beta=1.0,
        temperature=cfg.rollout.temperature,
        top_p=1.0,
        max_completion_length=cfg.budget.max,  # OPD's fixed budget M_max
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.grad_clip,
        optim="adamw_torch",
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=mini // micro,
        max_steps=len(rounds) * steps,
        shuffle_dataset=False,
        seed=seed,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": prompt_of(pid)} for pid in order]),
        processing_class=tok,
    )
    clock = {"generation": 0.0, "teacher": 0.0}
    seen: list[list[int]] = []
    lengths: list[int] = []
    t_model = trainer.accelerator.unwrap_model(trainer.teacher_model)
    gen, hidden, tokenize = trainer._generate, trainer._get_last_hidden_state, trainer._tokenize_prompts

    def timed_generate(batch: list) -> Any:
        t = time.perf_counter()
        got = gen(batch)
        clock["generation"] += time.perf_counter() - t
        lengths.extend(len(ids) for ids in got[1])
        return got

    def timed_hidden(model: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return hidden(model, *a, **k)
        finally:
            if model is t_model:
                clock["teacher"] += time.perf_counter() - t

    def kept_tokenize(batch: list) -> Any:
        got = tokenize(batch)
        seen.extend(list(map(int, ids)) for ids in got[0])
        return got

    trainer._generate, trainer._get_last_hidden_state = timed_generate, timed_hidden
    trainer._tokenize_prompts = kept_tokenize
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    final = out / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(str(final))
    ours = encode_prompts(tok, [prompts[pid] for pid in order], cfg.data.template, chat)
    same_prompts = [list(x) for x in ours] == seen
    del trainer, student, teacher
    ec = cfg.eval
    res = evaluate(
        str(final), ec.data, n=ec.n, temperature=ec.temperature, top_p=ec.top_p,
        max_tokens=ec.max_tokens or cfg.budget.max, checker=ec.checker, template=cfg.data.template,
        chat=chat, seed=cfg.rollout.seed, kv_cache_gib=1, enforce_eager=True, out=out / "eval.json",
        k=cfg.rollout.k, teacher=ec.teacher, teacher_k=cfg.rollout.k, band=ec.band,
    )  # fmt: skip
    return {
        "seed": seed,
        "wall": wall,
        "phases": {
            "generation": clock["generation"],
            "teacher": clock["teacher"],
            "training": wall - clock["generation"] - clock["teacher"],
        },
        "optimizer_steps": len(rounds) * steps,
        "completions": len(order),
        "mean_completion_length": statistics.fmean(lengths) if lengths else None,
        "prompt_ids_identical": same_prompts,
        "accuracy_final": res.accuracy,
        "full_kl_final": res.full_kl,
        "teacher_nll_final": res.teacher_nll,
        "backend": "vLLM colocate" if use_vllm else "transformers generate",
    }


def replay_seconds(root: Path) -> float:
    """opdcache's re-run: score and train every cached round of ``root`` again (no model but the student)."""
    from opdcache.config import read_run_config
    from opdcache.loop import replay
    from opdcache.rundir import RunDir

    run = RunDir(root)
    sub = run.replay("rerun")
    if sub.root.exists():
        shutil.rmtree(sub.root)  # the benchmark's own earlier re-run
    t = time.perf_counter()
    replay(run, "rerun", read_run_config(run).score.spec, progress=False)
    return time.perf_counter() - t


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def fmt(xs: list[float], p: int = 3) -> str:
    m, se = mean_se(xs)
    return f"{m:.{p}f} ± {se:.{p}f}"


def table(rows: dict[str, list[dict]], bytes_kept: dict[str, float], rerun: dict[str, float]) -> str:
    head = (
        "| tool / arm | final accuracy | full KL | teacher NLL | wall (s) | x TRL wall | generation (s) "
        "| teacher (s) | training (s) | teacher bytes kept | re-run (s) |\n|" + "---|" * 11
    )
    lines = [head]
    trl_wall = {r["seed"]: r["wall"] for r in rows["TRL"]}
    for name, rs in rows.items():
        ph = {k: [r["phases"][k] for r in rs] for k in ("generation", "teacher", "training")}
        ratio = [r["wall"] / trl_wall[r["seed"]] for r in rs]
        lines.append(
            f"| {name} | {fmt([r['accuracy_final'] for r in rs])} | {fmt([r['full_kl_final'] for r in rs], 4)} "
            f"| {fmt([r['teacher_nll_final'] for r in rs], 4)} | {fmt([r['wall'] for r in rs], 0)} "
            f"| {fmt(ratio, 2)} | {fmt(ph['generation'], 0)} | {fmt(ph['teacher'], 0)} | {fmt(ph['training'], 0)} "
            f"| {bytes_kept[name] / 1e6:.2f} MB | {rerun[name]:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default="vs-trl", help="benchmark directory (opdcache runs, TRL runs, the table)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--task", choices=list(TASK_PAIR), default="arithmetic")
    ap.add_argument(
        "--tiny", action="store_true", help="the demo's smoke sizes, one seed, OPD only (what the test runs)"
    )
    ap.add_argument(
        "--trl-vllm", action="store_true", help="TRL generates with vLLM colocate, not transformers"
    )
    a = ap.parse_args()
    out = Path(a.out).resolve()
    seeds = (a.seeds[0],) if a.tiny else tuple(a.seeds)
    arms = ("opd",) if a.tiny else ARMS  # tiny: the comparison's figures, without Prune-OPD's runs
    mine = opdcache_side(out / "opdcache", seeds, a.task, a.tiny, arms)
    rows: dict[str, list[dict]] = {"TRL": []}
    for arm in arms:
        rows[f"opdcache {'OPD' if arm == 'opd' else 'Prune-OPD'}"] = [
            {**r, "wall": r["train_seconds"]} for r in mine["rows"] if r["arm"] == arm
        ]
    opd_runs = {r["seed"]: Path(r["root"]) for r in mine["rows"] if r["arm"] == "opd"}
    for seed in seeds:
        rows["TRL"].append(trl_side(opd_runs[seed], out / "trl" / f"s{seed}", seed, a.trl_vllm))
    bytes_kept = {k: statistics.fmean(r.get("teacher_bytes", 0) for r in rs) for k, rs in rows.items()}
    rerun = {k: statistics.fmean(r["wall"] for r in rs) for k, rs in rows.items()}
    rerun["opdcache OPD"] = replay_seconds(opd_runs[seeds[0]])
    if "prune" in arms:
        rerun["opdcache Prune-OPD"] = replay_seconds(
            next(Path(r["root"]) for r in mine["rows"] if r["arm"] == "prune" and r["seed"] == seeds[0])
        )
    md = table(rows, bytes_kept, rerun)
    trl, opd = rows["TRL"], rows["opdcache OPD"]
    by_seed = {r["seed"]: r for r in trl}
    diff = {
        k: [r[k] - by_seed[r["seed"]][k] for r in opd]
        for k in ("accuracy_final", "full_kl_final", "teacher_nll_final")
    }
    ratio = [r["wall"] / by_seed[r["seed"]]["wall"] for r in opd]
    print(f"TRL generation backend: {trl[0]['backend']}; prompt token ids identical to opdcache's: "
          f"{all(r['prompt_ids_identical'] for r in trl)}")  # fmt: skip
    for name, rs in rows.items():
        ph = {k: statistics.fmean(r["phases"][k] for r in rs) for k in ("generation", "teacher", "training")}
        print(f"{name}: wall s {statistics.fmean(r['wall'] for r in rs):.1f} (generation {ph['generation']:.1f}, "
              f"teacher {ph['teacher']:.1f}, training {ph['training']:.1f}); final accuracy "
              f"{fmt([r['accuracy_final'] for r in rs])}; full KL {fmt([r['full_kl_final'] for r in rs], 4)}; "
              f"teacher NLL {fmt([r['teacher_nll_final'] for r in rs], 4)}")  # fmt: skip
    for k in ("generation", "teacher", "training"):
        num = statistics.fmean(r["phases"][k] for r in opd)
        den = statistics.fmean(r["phases"][k] for r in trl)
        print(f"ratio opdcache OPD / TRL {k}: {num / den if den else float('nan'):.2f}")
    print(f"ratio opdcache OPD / TRL wall: {fmt(ratio, 2)} (goal <= 0.5)")
    for k, v in diff.items():
        m, se = mean_se(v)
        print(f"opdcache OPD - TRL {k}: {m:+.4f} ± {se:.4f} (s.e., seeds as replicates)")
    print(f"teacher bytes kept: opdcache OPD {bytes_kept['opdcache OPD'] / 1e6:.2f} MB, TRL 0")
    print(f"re-run s: opdcache OPD replay {rerun['opdcache OPD']:.1f}, TRL {rerun['TRL']:.1f}")
    payload = {"rows": rows, "bytes_kept": bytes_kept, "rerun": rerun, "diff": diff, "wall_ratio": ratio}
    (out / "vs_trl.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "vs_trl.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
