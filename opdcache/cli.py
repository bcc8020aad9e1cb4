"""``opdcache`` command line: one subcommand per pipeline stage, all talking through RUN/."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import duckdb

from opdcache import __version__
from opdcache.config import DataConfig
from opdcache.errors import OpdcacheError


def _rounds(text: str) -> list[int]:
    """'3' -> [3]; '0-2' -> [0, 1, 2]; '0,4-5' -> [0, 4, 5]."""
    out: list[int] = []
    try:
        for item in text.split(","):
            lo, _, hi = item.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"rounds {text!r}: expected e.g. 3, 0-2 or 0,4-5") from e
    return out


def cmd_init(args: argparse.Namespace) -> None:
    from opdcache.arms import plan
    from opdcache.budget import BudgetController
    from opdcache.config import load_config, write_run_config
    from opdcache.query import refresh_duckdb_file

    cfg = load_config(args.config, args.set)
    Path(args.run).mkdir(parents=True, exist_ok=True)
    path = write_run_config(args.run, cfg)
    BudgetController(args.run, plan(cfg).budget).save()
    refresh_duckdb_file(args.run)
    print(f"wrote {path}")


def cmd_score(args: argparse.Namespace) -> None:
    from opdcache.config import read_run_config
    from opdcache.query import refresh_duckdb_file
    from opdcache.score.stage import score_run
    from opdcache.score.variant import VariantSpec

    cfg = read_run_config(args.run)
    base = cfg.score.spec() if cfg is not None else VariantSpec()
    spec = _spec(base, args)
    name = args.variant or (cfg.score.variant if cfg is not None else "prune")
    summaries = score_run(args.run, name, spec, _round_list(args), progress=not args.quiet)
    refresh_duckdb_file(args.run)
    metric = "accept" if spec.metric == "top_p" else "overlap"
    print(f"variant {name}: {json.dumps(spec.to_meta())}")
    print(
        f"{'round':>5} {'responses':>9} {'positions':>10} {'mean ' + metric:>12} {'retained':>8} {'mean E':>8}"
    )
    for s in summaries:
        print(
            f"{s['round']:>5} {s['responses']:>9} {s['positions']:>10} {s['mean_metric']:>12.4f} "
            f"{s['retained_fraction']:>8.3f} {s['effective_len_mean']:>8.1f}"
        )


def cmd_budget(args: argparse.Namespace) -> None:
    from opdcache.arms import plan
    from opdcache.budget import BudgetController
    from opdcache.config import read_run_config
    from opdcache.query import refresh_duckdb_file
    from opdcache.rundir import RunDir
    from opdcache.score.stage import read_effective_lengths

    RunDir(args.run).require()
    cfg = read_run_config(args.run)
    ctl = BudgetController(args.run, plan(cfg).budget if cfg is not None else None)
    if args.round is not None:
        variant = args.variant or (plan(cfg).budget_variant if cfg is not None else "prune")
        ctl.update(args.round, read_effective_lengths(args.run, variant, args.round))
        refresh_duckdb_file(args.run)
    s = ctl.state
    print(
        f"{'round':>5} {'M_t':>6} {'hit':>6} {'E mean':>8} {'E min':>6} {'E max':>6} {'action':>7} {'M_t+1':>6}"
    )
    for d in s.history:
        print(
            f"{d.round:>5} {d.max_tokens:>6} {d.hit_ratio:>6.3f} {d.effective_len_mean:>8.1f} "
            f"{d.effective_len_min:>6} {d.effective_len_max:>6} {d.action:>7} {d.next_max_tokens:>6}"
        )
    print(f"next round {s.next_round}: max_tokens = {s.max_tokens} (low-hit rounds in a row: {s.low_hits})")


def cmd_query(args: argparse.Namespace) -> None:
    from opdcache.query import refresh_duckdb_file, run_sql

    if (args.sql is None) == (args.file is None):
        raise OpdcacheError("query: give either SQL text or --file FILE")
    sql = args.sql if args.sql is not None else _read_text(args.file)
    params = dict(_kv(p) for p in args.param)
    try:
        _print_result(run_sql(args.run, sql, params), args.format, args.max_rows)
    except duckdb.Error as e:
        raise OpdcacheError(f"query failed: {e}") from e
    finally:
        refresh_duckdb_file(args.run)


def _print_result(rel: duckdb.DuckDBPyRelation | None, fmt: str, max_rows: int) -> None:
    if rel is None:
        return
    if fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(rel.columns)
        w.writerows(rel.fetchall())
    elif fmt == "json":
        rows = [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]
        print(json.dumps(rows, default=str, indent=1))
    else:
        rel.show(max_rows=max_rows, max_width=200)


def _run_config(run: str):
    from opdcache.config import read_run_config
    from opdcache.rundir import RunDir

    RunDir(run).require()
    cfg = read_run_config(run)
    if cfg is None:
        raise OpdcacheError(f"{run}: no config.yaml; create the run with `opdcache init {run} --config FILE`")
    return cfg


def cmd_rollout(args: argparse.Namespace) -> None:
    from opdcache.rollout.stage import rollout_round

    s = rollout_round(args.run, args.round, _run_config(args.run), progress=not args.quiet)
    print(
        f"rollout round {s['round']}: budget {s['max_tokens']}, {s['parts']} parts ({s['skipped']} already done), "
        f"{s['tokens']} tokens" + (f", {s['tokens_per_s']:.0f} tokens/s" if s["tokens"] else "")
    )


def cmd_teacher(args: argparse.Namespace) -> None:
    from opdcache.query import refresh_duckdb_file
    from opdcache.teacher.stage import teacher_round

    s = teacher_round(args.run, args.round, _run_config(args.run), progress=not args.quiet)
    refresh_duckdb_file(args.run)
    print(
        f"teacher round {s['round']}: {s['parts']} parts scored, {s['tokens']} positions"
        + (f", {s['tokens_per_s']:.0f} positions/s" if s["tokens"] else "")
    )


def cmd_train(args: argparse.Namespace) -> None:
    from opdcache.train.stage import train_round

    cfg = _run_config(args.run)
    s = train_round(args.run, args.round, cfg, args.variant or cfg.score.variant, progress=not args.quiet)
    if s["skipped"]:
        print(f"train round {args.round}: checkpoint for round {args.round + 1} exists, skipped")
    else:
        print(
            f"train round {args.round}: {s['steps']} steps, {s['tokens']} tokens, {s['tokens_per_s']:.0f} tokens/s, "
            f"loss {s['loss_first']:.4g} -> {s['loss_last']:.4g}"
        )


def _print_round(out: dict) -> None:
    d = out["decision"]
    t = out["train"]
    trained = (
        "skipped"
        if t["skipped"]
        else f"{t['steps']} steps, loss {t['loss_first']:.4g} -> {t['loss_last']:.4g}"
    )
    print(
        f"round {out['round']}: M_t {d['max_tokens']}, E mean {d['effective_len_mean']:.1f}, hit {d['hit_ratio']:.2f} "
        f"-> {d['action']} M_t+1 {d['next_max_tokens']}; train {trained}"
    )


def cmd_run(args: argparse.Namespace) -> None:
    from opdcache.loop import run_rounds, start_run

    cfg = start_run(args.config, args.run, args.set)
    for out in run_rounds(args.run, args.rounds, cfg, progress=not args.quiet):
        _print_round(out)
    print(
        f"{args.run}: {args.rounds} rounds done; wall times: opdcache query {args.run} 'select * from stage_times'"
    )


def cmd_round(args: argparse.Namespace) -> None:
    from opdcache.loop import run_round

    _print_round(run_round(args.run, args.round, _run_config(args.run), progress=not args.quiet))


def cmd_replay(args: argparse.Namespace) -> None:
    from opdcache.loop import replay

    cfg = _run_config(args.run)
    spec = _spec(cfg.score.spec(), args)
    out = replay(
        args.run, args.variant, spec, _round_list(args), progress=not args.quiet, train=not args.no_train
    )
    print(
        f"replay written to {out}; compare: opdcache query {args.run} "
        '"select run, stage, sum(seconds) from stage_times group by all order by all"'
    )


def cmd_verify(args: argparse.Namespace) -> None:
    from opdcache.verify import verify_run

    n, findings = verify_run(args.run, progress=not args.quiet)
    errors = [f for f in findings if f.severity == "error"]
    for f in findings:
        print(
            f"{f.severity}: {f.problem}"
            if f.problem.startswith(f.path)
            else f"{f.severity}: {f.path}: {f.problem}"
        )
    if errors:
        raise OpdcacheError(f"verify: {len(errors)} of {n} parts failed")
    print(f"verify: {n} parts OK" + (f" ({len(findings)} notes)" if findings else ""))


def cmd_synth(args: argparse.Namespace) -> None:
    from opdcache.cache.synthetic import write_synthetic_run
    from opdcache.query import refresh_duckdb_file

    write_synthetic_run(
        args.run,
        rounds=args.rounds,
        parts_per_round=args.parts,
        prompts_per_part=args.prompts,
        mean_len=args.mean_len,
        max_tokens=args.max_tokens,
        overlap=args.overlap,
        drift=args.drift,
        seed=args.seed,
    )
    refresh_duckdb_file(args.run)
    print(f"wrote a synthetic cache of {args.rounds} rounds under {Path(args.run) / 'cache'}")


def cmd_eval(args: argparse.Namespace) -> None:
    from opdcache.evaluation import evaluate

    res = evaluate(
        args.checkpoint,
        args.data,
        args.n,
        args.temperature,
        args.max_tokens,
        args.checker,
        args.template,
        args.chat_template,
        args.seed,
        args.kv_cache_gib,
        args.enforce_eager,
        args.out,
    )
    print(
        f"{args.checkpoint} on {args.data}: Avg@{res.n} = {res.accuracy:.4f}, pass@{res.n} = "
        f"{res.pass_at_n:.4f} over {res.prompts} prompts; mean length {res.mean_response_tokens:.0f} tokens, "
        f"{res.truncated:.1%} truncated ({res.seconds:.0f} s)"
        + (f"; written to {args.out}" if args.out else "")
    )


def cmd_report(args: argparse.Namespace) -> None:
    from opdcache.report import make_report

    path = make_report(args.runs, args.out, args.band_scale, args.bucket, args.every, args.sql_dir)
    print(f"wrote {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    from opdcache.demo import run_demo

    res = run_demo(args.out, args.smoke, args.rounds, tuple(args.seeds), progress=not args.quiet)
    print(res["table"])
    print(f"\ndemo finished in {res['seconds']:.0f} s; summary {res['summary']}, report {res['report']}")


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise OpdcacheError(f"{path}: cannot read ({e.strerror})") from e


def _kv(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.isidentifier():
        raise OpdcacheError(f"--param {item!r}: expected name=value")
    return key, value


def _round_command(sub, name: str, func, text: str) -> argparse.ArgumentParser:
    """A subcommand acting on one round of an initialised run."""
    s = sub.add_parser(name, help=text)
    s.add_argument("run")
    s.add_argument("--round", type=int, required=True)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=func)
    return s


def _variant_args(s: argparse.ArgumentParser, metrics: list[str]) -> None:
    s.add_argument("--metric", choices=metrics)
    s.add_argument("--gamma", type=float, help="overlap threshold (eq. 7; default 0.7)")
    s.add_argument("--top-p", type=float, help="nucleus mass for metric top_p (App. A.10; default 0.95)")
    s.add_argument("--w-drop", type=float, help="penalty per bad event (eq. 9; default 0.01)")
    s.add_argument("--w-base", type=float, help="base weight (eq. 10; default 0.5)")
    s.add_argument("--eps", type=float, help="effective-length tolerance (eq. 12; default 1e-8)")
    s.add_argument("--rounds", type=_rounds, nargs="+", help="rounds, e.g. 0-3 or 0,4-5 (default: all)")


def _spec(base, args: argparse.Namespace):
    extra = {k: getattr(args, k, None) for k in ("reference", "match", "seed")}
    return base.replace(
        metric=args.metric,
        gamma=args.gamma,
        top_p=args.top_p,
        w_drop=args.w_drop,
        w_base=args.w_base,
        eps=args.eps,
        **extra,
    )


def _round_list(args: argparse.Namespace) -> list[int] | None:
    return sorted({r for group in args.rounds for r in group}) if args.rounds else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opdcache", description=__doc__)
    p.add_argument("--version", action="version", version=f"opdcache {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="create a run directory from a YAML config")
    s.add_argument("run")
    s.add_argument("--config", help="YAML config (default: built-in defaults)")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key",
    )
    s.set_defaults(func=cmd_init)

    _round_command(sub, "rollout", cmd_rollout, "student rollouts with vLLM into RUN/rollouts/")
    _round_command(sub, "teacher", cmd_teacher, "teacher top-k and gathered log-probs into RUN/cache/")
    s = _round_command(
        sub, "train", cmd_train, "one round of OPD training under DeepSpeed → RUN/checkpoints/round=R+1"
    )
    s.add_argument("--variant", help="variant whose weights L scale the rewards (default: score.variant)")

    s = sub.add_parser("run", help="all rounds of Algorithm 1: rollout, teacher, score, train, budget")
    s.add_argument("config")
    s.add_argument("run")
    s.add_argument(
        "--rounds", type=int, required=True, help="total rounds (a rerun continues where it stopped)"
    )
    s.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key"
    )
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_run)

    _round_command(sub, "round", cmd_round, "one round of Algorithm 1 on an initialised run")

    s = sub.add_parser("replay", help="re-score the cache and retrain from round 0, calling no teacher")
    s.add_argument("run")
    s.add_argument("--variant", required=True, help="name of the replay (RUN/replays/NAME)")
    _variant_args(s, ["overlap", "top_p", "none"])
    s.add_argument(
        "--no-train", action="store_true", help="score and decide budgets only (e.g. a gamma sweep)"
    )
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("score", help="score cached rounds with one reliability variant (eqs. 6-12)")
    s.add_argument("run")
    s.add_argument("--variant", help="variant name (default: the run config's score.variant, else 'prune')")
    _variant_args(s, ["overlap", "top_p", "none", "random"])
    s.add_argument("--reference", help="random: variant whose retention is matched")
    s.add_argument(
        "--match", choices=["fraction", "mass"], help="random: match token fraction or reward mass"
    )
    s.add_argument("--seed", type=int, help="random: seed")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("budget", help="show the budget controller, or decide a round (Alg. 1)")
    s.add_argument("run")
    s.add_argument("--round", type=int, help="decide this round from its effective lengths")
    s.add_argument("--variant", help="variant whose effective lengths drive the budget")
    s.set_defaults(func=cmd_budget)

    s = sub.add_parser("query", help="run SQL over the run's DuckDB views")
    s.add_argument("run")
    s.add_argument("sql", nargs="?")
    s.add_argument("--file", help="SQL file, e.g. analysis/overlap_by_depth.sql")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="SET VARIABLE NAME")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.add_argument("--max-rows", type=int, default=100)
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("verify", help="check every part against its integrity record and the contract")
    s.add_argument("run")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("eval", help="Avg@n accuracy of a checkpoint on a prompt file (vLLM)")
    s.add_argument("checkpoint")
    s.add_argument("--data", required=True, help="JSONL/Parquet with prompt_id, question, answer")
    s.add_argument("--n", type=int, default=16, help="samples per prompt (default 16)")
    s.add_argument("--temperature", type=float, default=0.6)
    s.add_argument("--max-tokens", type=int, default=4096)
    s.add_argument(
        "--checker",
        choices=["math", "exact"],
        default="math",
        help="math: math-verify equivalence (real data); exact: boxed string match (toy)",
    )
    s.add_argument("--template", default=DataConfig.template, help="prompt template (default: DAPO-Math)")
    s.add_argument("--chat-template", action="store_true", help="wrap prompts in the chat template")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kv-cache-gib", type=int, default=2, help="CPU only: vLLM KV cache size")
    s.add_argument("--enforce-eager", action="store_true", help="vLLM without graph capture")
    s.add_argument("--out", help="write the result (JSON) here")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("report", help="Markdown + PNG report of runs from the analysis/ SQL")
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", required=True, help="report directory")
    s.add_argument("--band-scale", type=int, default=1000, help="depth band unit for overlap_by_depth")
    s.add_argument("--bucket", type=int, default=256, help="position bucket for weight_by_position")
    s.add_argument("--every", type=int, default=2, help="plot every Nth round")
    s.add_argument("--sql-dir", help="folder of the analysis queries (default: the project's analysis/)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("demo", help="Prune-OPD vs OPD vs truncation on the toy task, end to end")
    s.add_argument("--out", default="demo", help="demo directory (default ./demo)")
    s.add_argument("--smoke", action="store_true", help="tiny sizes (what the tests run)")
    s.add_argument("--rounds", type=int, help="rounds per arm (default 4; smoke 1)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0], help="rollout/train seeds to repeat over")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", help="write a synthetic cache (no models) to try scoring and SQL")
    s.add_argument("run")
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--parts", type=int, default=2)
    s.add_argument("--prompts", type=int, default=8, help="prompts per part (2 samples each)")
    s.add_argument("--mean-len", type=int, default=400)
    s.add_argument("--max-tokens", type=int, default=1024)
    s.add_argument("--overlap", type=float, default=0.9)
    s.add_argument("--drift", type=float, default=0.3, help="overlap lost per 1000 tokens of depth")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)
    return p


READ_ONLY = {"query", "verify"}  # every other command writes to the run directory
NO_RUN = {"eval", "report", "demo"}  # no RUN argument (demo locks each of its runs itself)
CREATES_RUN = {"init", "run", "synth"}


def main(argv: Sequence[str] | None = None) -> int:
    from opdcache.lock import RunLock

    args = build_parser().parse_args(argv)
    try:
        if args.command in READ_ONLY or args.command in NO_RUN:
            args.func(args)
        else:
            if args.command in CREATES_RUN:
                Path(args.run).mkdir(parents=True, exist_ok=True)
            with RunLock(args.run):
                args.func(args)
    except OpdcacheError as e:
        print(f"opdcache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opdcache: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
