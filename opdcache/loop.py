"""The round loop: rollout -> teacher -> score -> train -> budget, each stage skipped when done.

    opdcache run CONFIG RUN [--rounds R]
    torchrun --nproc_per_node N -m opdcache.cli run CONFIG RUN --rounds R   # sharded over N ranks
    opdcache round RUN --round r
    opdcache replay RUN --variant NAME [scoring params]

A killed run resumes at the stage it was in: every stage's outputs are written atomically and a
stage whose outputs exist is skipped (``RunDir.done``). Each stage's wall time is appended to
RUN/stage_times.jsonl (view ``stage_times``), wall time being the paper's headline metric.

Under a launcher (WORLD_SIZE > 1) ``opdcache run`` shards every round: rank i rolls out, completes
with the teacher and scores the parts p with p mod N = i (shard.py), all ranks train together
(DeepSpeed), and rank 0 alone creates the run, evaluates and decides the budget. Barriers: after
rank 0 starts the run, before each score variant (a ``random`` variant matches its mask over the
whole round), before training (every part scored) and after the budget decision. Rollout part p
and teacher part p belong to the same rank, so the teacher waits for no one. ``opdcache round`` and
``replay`` are one process and refuse a launcher.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

from opdcache.arms import plan
from opdcache.budget import BudgetController
from opdcache.config import RunConfig, load_config, read_run_config, write_run_config
from opdcache.errors import OpdcacheError
from opdcache.models.checkpoint import require_checkpoint
from opdcache.results import EvalRoundResult, RoundResult
from opdcache.rollout.engine import PersistentEngine
from opdcache.rollout.stage import engine_settings, run_context_length
from opdcache.rundir import RunDir
from opdcache.shard import WHOLE, Shard, barrier
from opdcache.stages import RoundContext, budget_step, rollout_step, teacher_step, train_step
from opdcache.stagetimes import timed
from opdcache.teacher.stage import ResidentTeacher
from opdcache.train.stage import ResidentTrainer
from opdcache.variant import VariantSpec


def eval_round(
    run: RunDir,
    r: int,
    cfg: RunConfig,
    engines: PersistentEngine | None = None,
    teacher: ResidentTeacher | None = None,
) -> EvalRoundResult | None:
    """Avg@n of the checkpoint round r samples from -> RUN/eval/round=r.json (skipped when present);
    with ``eval.teacher``, the distillation metrics too.

    With ``engines`` (``opdcache run``) the run's one vLLM engine evaluates, its weights swapped in
    place; with ``teacher`` the run's resident teacher serves the metrics when ``eval.teacher`` is it.
    """
    from opdcache.evaluation import evaluate, read_eval
    from opdcache.models.checkpoint import student_checkpoint

    ec = cfg.eval
    if not ec.data:
        return None

    def stage() -> EvalRoundResult:
        if run.done("eval", r):
            return EvalRoundResult(r, True, read_eval(run.eval_result(r)).accuracy)
        t_model = None
        if ec.teacher:
            t_model = (teacher or ResidentTeacher()).get(cfg, ec.teacher)[0]
        with nullcontext(engines) if engines else PersistentEngine(**engine_settings(cfg)) as eng:
            res = evaluate(
                student_checkpoint(run, cfg, r),
                ec.data,
                n=ec.n,
                temperature=ec.temperature,
                top_p=ec.top_p,
                max_tokens=ec.max_tokens or cfg.budget.max,
                checker=ec.checker,
                template=cfg.data.template,
                chat=cfg.data.chat_template,
                fields=ec.fields,
                seed=cfg.rollout.seed,
                out=run.eval_result(r),
                engines=eng,
                k=cfg.rollout.k,
                teacher=ec.teacher,
                teacher_k=cfg.rollout.k,
                band=ec.band,
                teacher_model=t_model,
                teacher_settings=dataclasses.asdict(cfg.teacher),
            )
        if teacher is not None:
            teacher.release()  # a GPU is handed back (on CPU it stays loaded)
        return EvalRoundResult(r, False, res.accuracy, res.startup_seconds)

    return timed(run.require(), r, "eval", stage)


class Residents:
    """The vLLM engine and the teacher one ``run_rounds`` call keeps across its rounds; a caller that
    runs several runs of one student (the demos' arms and seeds) passes one ``Residents`` to all of
    them, so each run reloads the engine's weights instead of starting an engine. A run with another
    round-0 student or other engine settings starts a new engine (weights are reloaded in place only
    between checkpoints of one architecture)."""

    def __init__(self) -> None:
        self.engines: PersistentEngine | None = None
        self.student = ""
        self.teacher = ResidentTeacher()
        self.sized: tuple[Path, int, RunConfig] | None = None  # whose context engines.min_len holds

    def engine_for(self, run: RunDir, cfg: RunConfig, start: int) -> PersistentEngine:
        """The engine for ``run`` from round ``start``, its context sized for rollouts and evaluation."""
        from opdcache.evaluation import eval_context
        from opdcache.models.checkpoint import student_checkpoint

        settings = engine_settings(cfg)
        if self.engines is None or self.engines.kwargs != settings or self.student != cfg.models.student:
            self.close()
            self.engines, self.student = PersistentEngine(**settings), cfg.models.student
        engines = self.engines
        if self.sized == (run.root, start, cfg):  # Residents.warm sized it for this run a moment ago
            return engines
        self.sized = (run.root, start, cfg)
        first = student_checkpoint(run, cfg, start)
        engines.min_len = run_context_length(cfg, first)
        if cfg.eval.data:
            ec = cfg.eval
            longest, mt = eval_context(
                first,
                ec.data,
                ec.max_tokens or cfg.budget.max,
                cfg.data.template,
                cfg.data.chat_template,
                ec.fields,
            )
            engines.min_len = max(engines.min_len, longest + mt)
        return engines

    def warm(self, run: RunDir, cfg: RunConfig, rounds: int) -> float:
        """Have the engine hold ``run``'s next student before ``run_rounds(run, rounds, ...)``, so that
        starting it (or reloading its weights) lands outside the run's stage times, as ``train.extensions.build_ops``
        builds DeepSpeed's op first; the seconds it took (0 when the run has no round left)."""
        from opdcache.models.checkpoint import student_checkpoint

        start = BudgetController(run, plan(cfg).budget).state.next_round
        if start >= rounds:
            return 0.0
        engines = self.engine_for(run, cfg, start)
        checkpoint = student_checkpoint(run, cfg, start)
        return engines.get(checkpoint, cfg.rollout.k, engines.min_len, cfg.rollout.seed)[1]

    def close(self) -> None:
        if self.engines is not None:
            self.engines.close()
        self.engines, self.student, self.sized = None, "", None

    def __enter__(self) -> Residents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_rounds(
    run: RunDir,
    rounds: int,
    cfg: RunConfig,
    progress: bool = True,
    shard: Shard = WHOLE,
    residents: Residents | None = None,
) -> list[RoundResult]:
    """Rounds from the controller's next round up to ``rounds``, evaluating every ``eval.every``.

    One vLLM engine serves every rollout and evaluation of the call: it starts with a context that
    fits both, and each new checkpoint's weights are loaded into it in place. The teacher and (on
    CPU) the trainer with its optimizer state stay in memory across rounds too. With ``shard`` i/N
    (N > 1, ``start_sharded_run`` first) this is worker i of a sharded run: each worker keeps its own
    engine, teacher and trainer, and only worker 0 evaluates (the others go on meanwhile).
    ``residents``: the engine and teacher to use and leave open (``Residents``); by default the call's
    own, closed at its end.
    """
    from opdcache.metrics import write_metrics

    start = BudgetController(run, plan(cfg).budget).state.next_round
    out = []
    trainer = ResidentTrainer()
    with nullcontext(residents) if residents else Residents() as res:
        engines, teacher = res.engine_for(run, cfg, start), res.teacher
        lead = shard.index == 0
        for r in range(start, rounds):
            if r % cfg.eval.every == 0 and lead:
                eval_round(run, r, cfg, engines, teacher)
            out.append(
                run_round(
                    run, r, cfg, progress, engines=engines, teacher=teacher, trainer=trainer, shard=shard
                )
            )
        if lead:
            eval_round(run, rounds, cfg, engines, teacher)
            write_metrics(run)  # with the last evaluation
    return out


def run_round(
    run: RunDir,
    r: int,
    cfg: RunConfig,
    progress: bool = True,
    generate: bool = True,
    train: bool = True,
    engines: PersistentEngine | None = None,
    teacher: ResidentTeacher | None = None,
    trainer: ResidentTrainer | None = None,
    shard: Shard = WHOLE,
) -> RoundResult:
    """One round of Algorithm 1. With ``generate=False`` (replay) the cache must already hold round r.

    ``engines``, ``teacher`` and ``trainer`` (``run_rounds``) keep the rollout engine, the teacher and the
    trainer across rounds. ``shard``: this worker of a sharded run (module docstring)."""
    from opdcache.metrics import write_metrics
    from opdcache.query import refresh_duckdb_file

    run.require()
    ctx = RoundContext(run, r, cfg, progress, shard, engines, teacher, trainer)
    m_t = ctx.budget.max_tokens_for(r)
    if generate:
        rollout_step(ctx)
        if engines is not None:
            engines.release()
        teacher_step(ctx)
    elif not run.shards(run.cache_round(r)):
        raise OpdcacheError(f"{run.cache_round(r)}: no cached rollouts to replay")
    for name, spec in ctx.plan.variants:
        barrier(shard)  # every part cached, and a random variant's reference scored, on all workers
        timed(
            run,
            r,
            f"score:{name}",
            lambda n=name, s=spec: score_variant_round(run, r, n, s, progress, cfg.score.workers, shard),
            shard=shard,
        )
    barrier(shard)  # training reads every part's scores
    t = train_step(ctx) if train else None
    if shard.index == 0:
        d = budget_step(ctx)
        write_metrics(run, cfg=cfg)
        refresh_duckdb_file(run)
    barrier(shard)  # the next round's budget is decided
    if shard.index != 0:
        d = next(d for d in BudgetController(run, ctx.plan.budget).state.history if d.round == r)
    return RoundResult(r, m_t, d, t)


def score_variant_round(
    run: RunDir, r: int, name: str, spec: VariantSpec, progress: bool, workers: int = 0, shard: Shard = WHOLE
):
    """Score round ``r`` as ``name`` unless it already is (a result with no rounds means skipped)."""
    from opdcache.results import ScoreResult
    from opdcache.score.stage import score_run

    if run.done("score", r, variant=name):
        return ScoreResult(name, spec, [])
    return score_run(run, name, spec, rounds=[r], progress=progress, workers=workers, shard=shard)


def resolve_inputs(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its local input paths absolute (a run works from any folder) and its models checked
    (:func:`~opdcache.models.checkpoint.require_checkpoint`)."""

    def local(value: str) -> str:
        return (
            str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value
        )

    for key in ("student", "teacher"):
        if name := getattr(cfg.models, key):
            require_checkpoint(name, f"models.{key}")
    if cfg.eval.teacher:
        require_checkpoint(cfg.eval.teacher, "eval.teacher")
    return dataclasses.replace(
        cfg,
        models=dataclasses.replace(
            cfg.models, student=local(cfg.models.student), teacher=local(cfg.models.teacher)
        ),
        data=dataclasses.replace(cfg.data, prompts=local(cfg.data.prompts)),
        eval=dataclasses.replace(cfg.eval, data=local(cfg.eval.data), teacher=local(cfg.eval.teacher)),
    )


def start_run(config_path: str | Path | None, run: RunDir, overrides: list[str] | None = None) -> RunConfig:
    """Create RUN from CONFIG, or check that an existing RUN was made from the same config.

    The prompt files are read and checked first: a bad file fails here, before anything is written.
    """
    from opdcache.config import config_diff
    from opdcache.prompts import load_prompts

    existing = read_run_config(run) if run.config.exists() else None
    if existing is not None and config_path is None and not overrides:
        return existing  # `opdcache run RUN`: continue the run as it was made
    cfg = resolve_inputs(load_config(config_path, overrides))
    if cfg.data.prompts:
        load_prompts(cfg.data.prompts, cfg.data.fields)
    if cfg.eval.data:
        load_prompts(cfg.eval.data, cfg.eval.fields)
    if existing is not None and existing != cfg:
        keys = config_diff(existing, cfg)
        raise OpdcacheError(
            f"{run.config} differs from {config_path or 'the defaults'} (with the --set overrides) in "
            f"{', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}; resume with the same config (or "
            f"`opdcache run {run.root} --rounds N` alone), or start a new run directory"
        )
    if existing is None:
        check_pair(cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    if existing is None:
        write_run_config(run, cfg)
    BudgetController(run, plan(cfg).budget).save()
    return cfg


def check_pair(cfg: RunConfig) -> None:
    """The teachers (``models.teacher``, ``eval.teacher``) share the student's tokenizer: checked when a
    run is made, before any compute (the teacher stage checks again, for a config changed since)."""
    from opdcache.teacher.stage import checked_vocab

    for teacher in dict.fromkeys(t for t in (cfg.models.teacher, cfg.eval.teacher) if t):
        if cfg.models.student:
            checked_vocab(teacher, cfg.models.student)


def start_sharded_run(
    config_path: str | Path | None, run: RunDir, overrides: list[str] | None, shard: Shard
) -> RunConfig:
    """``start_run`` for worker ``shard`` of a sharded run (``join_ranks`` first): worker 0 creates or
    checks RUN; the others wait for it, then check that their config is the run's."""
    if shard.index == 0:
        cfg = start_run(config_path, run, overrides)
    barrier(shard)
    if shard.index != 0:
        cfg = check_run_config(config_path, run, overrides)
    return cfg


def check_run_config(config_path: str | Path | None, run: RunDir, overrides: list[str] | None) -> RunConfig:
    """The config a worker other than 0 was launched with, which must be the one worker 0 wrote to RUN
    (a launcher may start workers on other hosts with their own copy of CONFIG)."""
    from opdcache.config import config_diff

    existing = read_run_config(run)
    if existing is None:
        raise OpdcacheError(
            f"{run.config}: missing after worker 0 started the run; is {run.root} shared storage?"
        )
    if config_path is None and not overrides:
        return existing
    cfg = resolve_inputs(load_config(config_path, overrides))
    if existing != cfg:
        raise OpdcacheError(
            f"{run.config} differs from this worker's {config_path or 'defaults'} (with the --set overrides) "
            f"in {', '.join(config_diff(existing, cfg)[:8])}; launch every worker with the same config"
        )
    return cfg


def replay(
    run: RunDir,
    variant: str,
    spec: VariantSpec,
    rounds: list[int] | None = None,
    progress: bool = True,
    train: bool = True,
    arm: str = "prune",
    objective: str | None = None,
) -> RunDir:
    """Re-score the cached rounds as ``variant`` and retrain from the round-0 student, calling no model
    but the student being trained (``train=False``: scores and budget decisions only). Output:
    RUN/replays/<variant>/ (its own scores, checkpoints, budget and stage times; the cache is the
    parent's, linked). ``arm``: prune (OPD x L) or prune-grpo (the gated objective, issue 24);
    ``objective``: the OPD loss (train.objective; default the run's)."""
    if arm not in ("prune", "prune-grpo"):
        raise OpdcacheError(f"replay --arm {arm!r}: expected prune or prune-grpo")
    run.require()
    cfg = read_run_config(run)
    if cfg is None:
        raise OpdcacheError(f"{run.root}: no config.yaml to replay")
    cached = run.rounds()
    todo = cached if rounds is None else rounds
    if missing := sorted(set(todo) - set(cached)):
        raise OpdcacheError(f"replay: rounds {missing} are not cached in {run.cache}")
    from opdcache.cache.shards import check_manifest, whole_round

    for r in todo:  # every input checked, byte for byte, before the replay writes anything
        for part in whole_round(run, r):
            check_manifest(part, full=True)
    sub = run.replay(variant)
    rcfg = dataclasses.replace(
        cfg,
        score=dataclasses.replace(cfg.score, variant=variant, spec=spec),
        arm=dataclasses.replace(cfg.arm, name=arm),
        train=dataclasses.replace(cfg.train, objective=objective or cfg.train.objective),
    )
    if sub.config.exists() and (made := read_run_config(sub)) != rcfg:
        diff = [
            f"{sec}.{f.name}"
            for sec in ("score", "arm", "train")
            for f in dataclasses.fields(getattr(rcfg, sec))
            if getattr(getattr(made, sec), f.name) != getattr(getattr(rcfg, sec), f.name)
        ]
        raise OpdcacheError(
            f"{sub.config}: replay {variant!r} was made with other settings ({', '.join(diff) or 'config'}); "
            "give it another --variant name, or the same settings to continue it"
        )
    fresh = not sub.root.exists()
    sub.root.mkdir(parents=True, exist_ok=True)
    try:
        if not sub.cache.exists():
            os.symlink(os.path.relpath(run.cache, sub.root), sub.cache)
        if not sub.config.exists():
            write_run_config(sub, rcfg)
        # the replay trains on the original rollouts, so its budget merely records what Alg. 1 would decide
        trainer = ResidentTrainer()
        for r in todo:
            run_round(sub, r, rcfg, progress, generate=False, train=train, trainer=trainer)
            fresh = False  # a finished round is kept, whatever comes after
    except OpdcacheError:
        if fresh:  # a replay refused in its first round (e.g. a damaged part) leaves nothing behind
            shutil.rmtree(sub.root, ignore_errors=True)
            if run.replays.is_dir() and not any(run.replays.iterdir()):
                run.replays.rmdir()
        raise
    return sub
