"""What both demos do with their jobs: each run started from the demo's YAML config and its job's
overrides, its round 0's evaluation shared, its rounds run on resident engines, the Prune-OPD cache's
gamma sweep replayed; then the per-run summary rows, the verdicts of ``analysis/demo/*.sql`` and
OUT/summary.md + summary.json. The descriptions (toy.py, real.py) say which pairs, arms and tasks."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from opdcache.arms import plan
from opdcache.config import RunConfig, read_run_config
from opdcache.lock import RunLock
from opdcache.loop import Residents, replay, run_rounds, start_run
from opdcache.query import run_sql
from opdcache.report import ANALYSIS
from opdcache.rundir import RunDir, atomic_write_bytes

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


@dataclass(frozen=True)
class Job:
    """One demo run: OUT/runs/<name>, made from the demo's YAML and ``sets`` (a callable: a calibrated
    gamma is read from an earlier run); ``first`` names the run whose round-0 evaluation it shares."""

    name: str
    first: str
    row: dict[str, Any]  # pair, arm, seed, ... : the summary row's first columns
    sets: Callable[[], list[str]]
    gammas: tuple[float, ...] = ()  # the score-only replays of its cache (the Prune-OPD arm)


@dataclass
class Ran:
    rows: list[dict[str, Any]]
    roots: list[Path]
    engine_seconds: float  # engine starts and weight loads before each run (Residents.warm)


def run_jobs(
    outd: Path,
    config: str,
    jobs: list[Job],
    rounds: int,
    summary: Callable[[Path, RunConfig], dict[str, Any]],
    overrides: tuple[str, ...] = (),
    progress: bool = True,
) -> Ran:
    """Run every job (a rerun resumes each), one engine per student across arms and seeds;
    ``overrides`` (``demo --set``) come after each job's own."""
    ran = Ran([], [], 0.0)
    with Residents() as residents:
        for job in tqdm(jobs, desc="demo runs", unit="run", disable=not progress):
            run = RunDir(outd / "runs" / job.name)
            run.root.mkdir(parents=True, exist_ok=True)
            with RunLock(run, "demo"):
                cfg = start_run(CONFIGS / config, run, job.sets() + list(overrides))
                shared = RunDir(outd / "runs" / job.first).eval_result(0)
                if shared != run.eval_result(0) and shared.exists() and not run.done("eval", 0):
                    # round 0 is the same checkpoint, data and seed in every arm: evaluate it once
                    run.evals.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(run.eval_result(0), shared.read_bytes())
                ran.engine_seconds += residents.warm(run, cfg, rounds)
                run_rounds(run, rounds, cfg, progress, residents=residents)
                for g in job.gammas:
                    replay(
                        run, f"gamma{g:g}", cfg.score.spec.replace(gamma=g), progress=progress, train=False
                    )
            ran.roots.append(run.root)
            ran.rows.append({**job.row, **summary(run.root, cfg)})
    return ran


def _analysis(name: str) -> str:
    return (ANALYSIS / name).read_text().rstrip().rstrip(";")


def run_summary(root: Path, cfg: RunConfig | None = None) -> dict[str, Any]:
    """Final accuracy, training wall time (evaluation excluded), last E and budget of one run."""

    def q(sql: str) -> tuple | None:
        rows = run_sql(root, sql).fetchall()
        return rows[0] if rows else None

    # evaluation is left out, but an engine start it made is charged to training (view stage_walls);
    # in the demos the engine is started or reloaded before each run (Residents.warm), outside its times
    train_s, work_s = q(
        "SELECT sum(train_seconds), sum(train_work_seconds) FROM stage_walls WHERE run = 'main'"
    )
    acc0 = q("SELECT accuracy FROM evals ORDER BY round LIMIT 1")
    acc = q("SELECT accuracy, round FROM evals ORDER BY round DESC LIMIT 1")
    gen = q("SELECT sum(response_len), avg(response_len) FROM rollouts")
    last = q("SELECT effective_len_mean, max_tokens, next_max_tokens FROM budget ORDER BY round DESC LIMIT 1")
    cfg = cfg or read_run_config(RunDir(root))
    per_e = q(
        f"SELECT sum(generated) / sum(effective), max(generated_per_effective) "
        f"FROM ({_analysis('generated_per_effective.sql')}) WHERE variant = '{plan(cfg).budget_variant}'"
    )
    teacher = q(
        f"SELECT sum(teacher_positions) / sum(kept) FROM ({_analysis('teacher_positions_per_kept.sql')})"
    )
    return {
        "run": root.name,
        "accuracy_start": acc0[0] if acc0 else None,
        "accuracy_final": acc[0] if acc else None,
        "train_seconds": train_s or 0.0,
        "work_seconds": work_s or 0.0,
        "generated_tokens": int(gen[0] or 0),
        "decoded_per_effective": per_e[0] if per_e else None,  # over the run (budget variant's E)
        "decoded_per_effective_max": per_e[1] if per_e else None,  # the largest round's
        "teacher_per_kept": teacher[0] if teacher else None,  # teacher positions computed per kept
        "mean_response_len": float(gen[1] or 0),
        "last_mean_effective_len": last[0] if last else None,
        "last_budget": last[1] if last else None,
        "next_budget": last[2] if last else None,
    }


def vs_opd(rows: list[dict[str, Any]], ratios: dict[str, str], opd_of: Callable[[dict], dict]) -> None:
    """``row[name]`` for each ``name: key`` of ``ratios``: the row's ``key`` over that of its OPD run."""
    for r in rows:
        opd = opd_of(r)
        for name, key in ratios.items():
            r[name] = r[key] / opd[key] if opd[key] else None


def fmt(v: Any, places: int = 3) -> str:
    return "-" if v is None else f"{v:.{places}f}"


Columns = list[tuple[str, Callable[[dict[str, Any]], str]]]  # (header, the cell of a row)


def markdown_table(rows: list[dict[str, Any]], columns: Columns) -> str:
    """A Markdown table: one line per row, a cell per column."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(c(r) for _, c in columns) + " |" for r in rows])


def seed_means_markdown(rows: list[dict[str, Any]]) -> str:
    """Mean and spread over seeds per pair and arm (accuracy: mean ± s.d. of the seeds' Avg@n)."""
    means = []
    for pair, arm in dict.fromkeys((r["pair"], r["arm"]) for r in rows):
        group = [r for r in rows if (r["pair"], r["arm"]) == (pair, arm)]
        v = {
            k: np.array([r[k] for r in group if r.get(k) is not None], dtype=float)
            for k in ("accuracy_final", "time_vs_opd", "work_vs_opd", "last_mean_effective_len")
        }
        acc = v["accuracy_final"]
        sd = acc.std(ddof=1) if len(acc) > 1 else 0.0
        means.append({"pair": pair, "arm": arm, "seeds": len(group), "acc": f"{acc.mean():.3f} ± {sd:.3f}" if len(acc) else "-",
                      **{k: x.mean() if len(x) else None for k, x in v.items()}})  # fmt: skip
    return markdown_table(means, [
        ("pair", lambda m: m["pair"]), ("arm", lambda m: m["arm"]), ("seeds", lambda m: str(m["seeds"])),
        ("acc. final (mean ± s.d.)", lambda m: m["acc"]), ("wall x OPD", lambda m: fmt(m["time_vs_opd"], 2)),
        ("work x OPD", lambda m: fmt(m["work_vs_opd"], 2)),
        ("last mean E", lambda m: fmt(m["last_mean_effective_len"], 0)),
    ])  # fmt: skip


def verdicts(runs: Path, sql: str) -> list[dict[str, Any]]:
    """The claims and their verdicts (``analysis/demo/<sql>`` over OUT/runs)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET VARIABLE runs = ?", [str(runs)])
    rel = con.sql((ANALYSIS / "demo" / sql).read_text())
    return [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]


def verdicts_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per claim; a ``wall_ratio`` column (the real demo's) becomes a "wall x OPD" column."""

    def value(v: dict[str, Any]) -> str:
        s = fmt(v["value"]) + ("" if v["se"] is None else f" ± {v['se']:.3f}")
        return s + ("" if v.get("relative") is None else f" ({v['relative']:+.0%})")  # the change, relative

    def verdict(v: dict[str, Any]) -> str:
        if v.get("needs_seeds"):
            return "needs >= 3 seeds"
        return "-" if v["holds"] is None else ("holds" if v["holds"] else "does not hold")

    columns: Columns = [("claim", lambda v: v["claim"]), ("pair", lambda v: str(v["pair"])),
                        ("seeds", lambda v: str(v["seeds"])), ("value ± s.e.", value)]  # fmt: skip
    if rows and "wall_ratio" in rows[0]:
        columns.append(("wall x OPD", lambda v: fmt(v["wall_ratio"], 2)))
    return markdown_table(rows, [*columns, ("verdict", verdict)])


def write_summary(outd: Path, text: str, payload: dict[str, Any]) -> None:
    atomic_write_bytes(outd / "summary.md", text.encode())
    atomic_write_bytes(outd / "summary.json", json.dumps(payload, indent=1, default=float).encode())
