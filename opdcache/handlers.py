"""What each ``opdcache`` subcommand does (cli.py declares them): read arguments, call the stage, return
its result for ``results.describe``. Heavy imports stay inside the handlers so ``--help`` is fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdcache.errors import OpdcacheError
from opdcache.rundir import RunDir

if TYPE_CHECKING:
    from opdcache.config import RunConfig
    from opdcache.stages import RoundContext

Args = argparse.Namespace


def _config(run: RunDir) -> RunConfig:
    from opdcache.config import read_run_config

    cfg = read_run_config(run)
    if cfg is None:
        raise OpdcacheError(
            f"{run.root}: no config.yaml; create the run with `opdcache init {run.root} --config FILE`"
        )
    return cfg


# variant flags that only one bad-event metric reads
_METRIC_OF = {
    "gamma": "overlap",
    "top_p": "top_p",
    "reference": "random",
    "match": "random",
    "seed": "random",
    "iw_gamma": "iw",
}


def _spec(base, a: Args):
    """``base`` VariantSpec with the variant flags given on the command line; a flag the resulting
    metric does not read is an error, not silently ignored."""
    names = ("metric", "gamma", "top_p", "w_drop", "w_base", "eps", "reference", "match", "seed", "iw_gamma")
    spec = base.replace(**{n: getattr(a, n, None) for n in names})
    for name, metric in _METRIC_OF.items():
        if getattr(a, name, None) is not None and spec.metric != metric:
            flag = "--" + name.replace("_", "-")
            raise OpdcacheError(
                f"{flag}: only metric {metric} reads it; this variant's metric is {spec.metric}"
            )
    return spec


def _pairs(items: list[str], flag: str, expected: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments of a repeated flag; the key must be an identifier."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise OpdcacheError(f"{flag} {item!r}: expected {expected}")
        out[key] = value
    return out


def _round_list(a: Args) -> list[int] | None:
    return sorted({r for group in a.rounds for r in group}) if a.rounds else None


def init(a: Args, run: RunDir) -> str:
    from opdcache.loop import start_run

    start_run(a.config, run, a.set)
    return f"wrote {run.config}"


def _context(a: Args, run: RunDir, cfg: RunConfig | None = None) -> RoundContext:
    """Round ``--round`` of the run, as ``opdcache run`` builds it (stages.py), for one stage command."""
    from opdcache.shard import WHOLE
    from opdcache.stages import RoundContext

    shard = getattr(a, "shard", None) or WHOLE
    return RoundContext(run, a.round, cfg or _config(run), not getattr(a, "quiet", False), shard)


def rollout(a: Args, run: RunDir):
    from opdcache.shard import pin_cpu_cores, pin_devices
    from opdcache.stages import rollout_step

    ctx = _context(a, run)
    if a.shard.count > 1:
        pin_devices(ctx.cfg.rollout.tensor_parallel_size)
        pin_cpu_cores()
    return rollout_step(ctx)


def teacher(a: Args, run: RunDir):
    from opdcache.shard import pin_devices
    from opdcache.stages import teacher_step

    ctx = _context(a, run)
    if a.shard.count > 1 and not ctx.cfg.teacher.device_map:
        pin_devices()
    return teacher_step(ctx)


def train(a: Args, run: RunDir):
    from opdcache.stages import train_step

    return train_step(_context(a, run), a.variant)


def score(a: Args, run: RunDir):
    from opdcache.arms import plan
    from opdcache.config import ScoreConfig, read_run_config
    from opdcache.score.stage import score_run
    from opdcache.stagetimes import record

    cfg = read_run_config(run)
    base = cfg.score if cfg is not None else ScoreConfig()
    name = base.variant if a.variant is None else a.variant
    spec = _spec(base.spec, a)
    if (
        cfg is not None
        and (own := dict(plan(cfg).variants).get(name)) is not None
        and own.to_meta() != spec.to_meta()
    ):
        # the variant every round scores (its E made the budget decisions, its L trained): it stays
        # what config.yaml says
        mine, given = own.to_meta(), spec.to_meta()
        diff = ", ".join(
            f"{k} {mine.get(k)} -> {given.get(k)}"
            for k in sorted(set(mine) | set(given))
            if mine.get(k) != given.get(k)
        )
        raise OpdcacheError(
            f"score --variant {name}: the run's own variant (config.yaml; its rounds drive the budget and "
            f"training) is not re-scored with other settings ({diff}); give them another --variant name"
        )
    res = score_run(run, name, spec, _round_list(a), not a.quiet, base.workers, a.shard)
    for r in res.rounds:
        record(run, r.round, f"score:{name}", r.seconds, 0.0, False, shard=a.shard)
    return res


def budget(a: Args, run: RunDir):
    from opdcache.arms import plan
    from opdcache.budget import BudgetController
    from opdcache.config import ScoreConfig, read_run_config
    from opdcache.score.stage import read_effective_lengths

    cfg = read_run_config(run)
    if a.round is None and a.variant:
        raise OpdcacheError("budget --variant: only with --round (it names the variant that decides it)")
    if a.round is not None and a.round not in run.rounds():
        cached = run.rounds()
        raise OpdcacheError(
            f"budget --round {a.round}: round {a.round} is not cached in {run.cache} "
            f"({f'cached: {cached[0]}-{cached[-1]}' if cached else 'no round cached'})"
        )
    if a.round is not None and cfg is not None:  # as `opdcache run` decides it
        from opdcache.stages import budget_step

        ctx = _context(a, run, cfg)
        budget_step(ctx, a.variant)
        return ctx.budget.state
    ctl = BudgetController(run, plan(cfg).budget if cfg is not None else None)
    if a.round is not None:  # a run without a config (`opdcache synth`): the default variant
        ctl.update(a.round, read_effective_lengths(run, a.variant or ScoreConfig().variant, a.round))
    return ctl.state


def _one_process(command: str) -> None:
    """``command`` drives every stage from one process: under a launcher each rank would redo all of it."""
    from opdcache.shard import Shard

    if Shard.of(None).count > 1:
        raise OpdcacheError(
            f"opdcache {command} runs in one process, not under a launcher (WORLD_SIZE > 1); use "
            "`torchrun ... -m opdcache.cli run CONFIG RUN --rounds R` or the sharded stage commands"
        )


def round_(a: Args, run: RunDir):
    from opdcache.loop import run_round

    _one_process("round")
    return run_round(run, a.round, _config(run), progress=not a.quiet)


def run_all(a: Args, run: RunDir) -> list[Any]:
    if a.config is None and not run.config.exists():
        raise OpdcacheError(
            f"RUN {run.root} holds no config.yaml: give a config (opdcache run CONFIG RUN) or `opdcache init` it"
        )
    shard = _run_shard(a, run)  # first: nothing may start CUDA before the worker's GPUs are pinned
    from opdcache.loop import run_rounds, start_run, start_sharded_run

    if shard.count == 1:
        cfg = start_run(a.config, run, a.set)
        done = run_rounds(run, a.rounds, cfg, progress=not a.quiet)
    else:
        cfg = start_sharded_run(a.config, run, a.set, shard)
        done = run_rounds(run, a.rounds, cfg, progress=not a.quiet and shard.index == 0, shard=shard)
        if shard.index != 0:
            return []  # worker 0 reports the rounds
    return [
        *done,
        f"{run.root}: {a.rounds} rounds done; wall times: opdcache query {run.root} 'select * from stage_times'",
    ]


def _run_shard(a: Args, run: RunDir):
    """This worker of ``opdcache run``: the launcher's RANK / WORLD_SIZE. Under a launcher the workers
    are pinned to their own GPUs and joined in a process group before anything starts CUDA."""
    from opdcache.config import load_config, read_run_config
    from opdcache.shard import Shard, join_ranks, pin_cpu_cores, pin_devices

    shard = Shard.of(None)
    if shard.count > 1:
        cfg = read_run_config(run) if a.config is None else load_config(a.config, a.set)
        pin_devices(cfg.rollout.tensor_parallel_size)
        pin_cpu_cores()
        join_ranks()
    return shard


def replay(a: Args, run: RunDir) -> str:
    from opdcache.loop import replay as replay_run

    _one_process("replay")

    spec = _spec(_config(run).score.spec, a)
    sub = replay_run(
        run,
        a.variant,
        spec,
        _round_list(a),
        progress=not a.quiet,
        train=not a.no_train,
        arm=a.arm,
        objective=a.objective,
    )
    return (
        f"replay written to {sub.root}; compare: opdcache query {run.root} "
        '"select run, stage, sum(seconds) from stage_times group by all order by all"'
    )


def metrics(a: Args, run: RunDir) -> str:
    from opdcache.metrics import write_metrics

    scalars = write_metrics(run, tensorboard=False if a.no_tensorboard else None)
    where = run.metrics if a.no_tensorboard else f"{run.metrics} and {run.tensorboard}/"
    return f"{len(scalars)} scalars in {where} (tensorboard --logdir {run.root})"


def query(a: Args, run: RunDir) -> None:
    import duckdb

    from opdcache.query import read_error, run_sql

    if (a.sql is None) == (a.file is None):
        raise OpdcacheError("query: give either SQL text or --file FILE")
    if a.sql is not None and not a.sql.strip():
        raise OpdcacheError("query: the SQL text is empty; give a statement or --file FILE")
    try:
        sql = a.sql if a.sql is not None else Path(a.file).read_text()
    except OSError as e:
        raise OpdcacheError(f"{a.file}: cannot read ({e.strerror})") from e
    params = _pairs(a.param, "--param", "name=value")
    try:
        rel = run_sql(run, sql, params, write=a.write)
        if rel is None:
            return
        if a.format == "csv":
            import csv

            w = csv.writer(sys.stdout)
            w.writerow(rel.columns)
            w.writerows(rel.fetchall())
        elif a.format == "json":
            print(
                json.dumps(
                    [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()],
                    default=str,
                    indent=1,
                )
            )
        else:
            rel.show(max_rows=a.max_rows, max_width=200)
    except duckdb.Error as e:
        raise read_error(run, e) from e


def verify(a: Args, run: RunDir) -> list[str]:
    from opdcache.lock import RunLock
    from opdcache.verify import repair_run, verify_run

    if a.repair:
        with RunLock(run, "verify --repair"):
            n, findings = verify_run(run, progress=not a.quiet)
            for line in repair_run(run, findings):
                print(line)
        return [
            f"verify --repair: {n} parts checked, {len(findings)} findings handled; run `opdcache verify {run.root}` again"
        ]
    n, findings = verify_run(run, progress=not a.quiet)
    lines = [
        f"{f.severity}: {f.problem}"
        if f.problem.startswith(f.path)
        else f"{f.severity}: {f.path}: {f.problem}"
        for f in findings
    ]
    for line in lines:
        print(line)
    if errors := [f for f in findings if f.severity == "error"]:
        raise OpdcacheError(f"verify: {len(errors)} of {n} parts failed")
    return [f"verify: {n} parts OK" + (f" ({len(findings)} notes)" if findings else "")]


def pack(a: Args, run: RunDir):
    from opdcache.pack import pack_run

    return pack_run(run, a.out, a.only, a.force, progress=not a.quiet)


def unpack(a: Args, _: None):
    from opdcache.pack import unpack_run
    from opdcache.query import refresh_duckdb_file

    res = unpack_run(a.archive, a.dest, progress=not a.quiet)
    run = RunDir(res.dest)
    for sub in (run, *run.replay_runs()):  # the views are not packed: they hold absolute paths
        refresh_duckdb_file(sub)
    return res


def probe(a: Args, run: RunDir) -> str:
    from opdcache.probe import describe_probe, run_probe

    res = run_probe(
        run.root, a.teacher, a.student, a.data, a.n, a.max_tokens, a.gamma, a.w_drop, a.chat_template,
        a.template, a.seed, a.band, a.config, a.set, progress=not a.quiet,
    )  # fmt: skip
    return describe_probe(res)


def synth(a: Args, run: RunDir) -> str:
    from opdcache.cache.synthetic import write_synthetic_run

    if run.cache.exists():
        raise OpdcacheError(
            f"RUN {run.root}: already holds a cache; synth writes into a new or initialised run"
        )
    write_synthetic_run(
        run.root,
        rounds=a.rounds,
        parts_per_round=a.parts,
        prompts_per_part=a.prompts,
        mean_len=a.mean_len,
        max_tokens=a.max_tokens,
        overlap=a.overlap,
        drift=a.drift,
        seed=a.seed,
    )
    return f"wrote a synthetic cache of {a.rounds} rounds under {run.cache}"


def evaluate(a: Args, _: None) -> list[Any]:
    from opdcache.config import check_template
    from opdcache.evaluation import evaluate as evaluate_checkpoint
    from opdcache.models.checkpoint import require_checkpoint

    check_template(a.template, "--template")
    require_checkpoint(a.checkpoint, "eval")
    if a.teacher:
        require_checkpoint(a.teacher, "--teacher")
    fields = _pairs(a.field, "--field", "ROLE=FIELD, e.g. answer=reward_model.ground_truth")
    res = evaluate_checkpoint(
        a.checkpoint,
        a.data,
        n=a.n,
        temperature=a.temperature,
        top_p=a.top_p,
        max_tokens=a.max_tokens,
        checker=a.checker,
        template=a.template,
        chat=a.chat_template,
        fields=fields,
        seed=a.seed,
        kv_cache_gib=a.kv_cache_gib,
        enforce_eager={"true": True, "false": False}.get(a.enforce_eager, "auto"),
        out=a.out,
        teacher=a.teacher,
        teacher_k=a.k,
        band=a.band,
        progress=not a.quiet,
    )
    return [res, f"written to {a.out}" if a.out else None]


def convert(a: Args, _: None) -> str:
    from opdcache.models.gguf import convert_gguf, parse_layer_range

    drop = parse_layer_range(a.drop_layers) if a.drop_layers is not None else None
    return f"wrote {convert_gguf(a.source, a.out, a.layers, drop)}"


def report(a: Args, _: None) -> str:
    from opdcache.report import make_report

    if not_runs := [r for r in a.runs if not RunDir(r).is_run()]:
        raise OpdcacheError(
            f"report: {', '.join(map(str, not_runs))}: not a run (no config.yaml or cache/); expected run directories"
        )

    return f"wrote {make_report(a.runs, a.out, a.band_scale, a.bucket, a.sql_dir)}"


def demo_overrides(a: Args) -> tuple[str, ...]:
    """The config overrides every demo run gets: --keep-last, then --set (checked here, before any work)."""
    from opdcache.config import load_config

    out = ((f"train.keep_checkpoints={a.keep_last}",) if a.keep_last else ()) + tuple(a.set)
    load_config(None, list(out))  # a bad key or value is one line now, not after the models are built
    return out


def demo(a: Args, _: None) -> list[str]:
    if a.real:
        from opdcache.demos.real import run_real_demo

        res = run_real_demo(
            a.data,
            a.out or "demo-real",
            a.smoke,
            a.rounds,
            tuple(a.seeds),
            not a.quiet,
            pairs=tuple(a.pairs) if a.pairs else None,
            objective=a.objective,
            compare=a.compare_objectives,
            arms=tuple(a.arms) if a.arms else None,
            task_name=a.task,
            overrides=demo_overrides(a),
        )
    else:
        from opdcache.demos.toy import run_demo

        if a.data:
            raise OpdcacheError("demo --data: only with --real (the toy demo writes its own prompts)")
        if a.arms or a.objective or a.compare_objectives or a.task != "arithmetic":
            raise OpdcacheError("demo --arms / --objective / --compare-objectives / --task: only with --real")
        res = run_demo(
            a.out or "demo",
            a.smoke,
            a.rounds,
            tuple(a.seeds),
            progress=not a.quiet,
            overrides=demo_overrides(a),
        )
    return [
        res["table"],
        f"\ndemo finished in {res['seconds']:.0f} s; summary {res['summary']}, report {res['report']}",
    ]
