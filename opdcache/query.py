"""DuckDB views over a run directory, and the ``opdcache query`` entry point.

Views (see docs/cache-format.md for columns):
  rollouts  one row per cached response (all cache columns + round + response_len)
  scores    one row per response per variant (variant, round, score columns)
  tokens    one row per response position per scored variant: round, prompt_id, sample, variant,
            pos (0-based), token_id, student_logprob, teacher_logprob, overlap, accept, bad, R, L
  variants  one row per variant with its parameters (from the score files' metadata)
  budget    the budget controller's decisions, one row per round
  stage_times  wall time of every stage per round (run = "main" or "replay:<variant>"), one line per
            call, and per worker of a sharded stage (shard "i/N")
  stage_walls  one row per run, round and stage: generated_tokens summed over all lines; seconds and
            work_seconds the slowest worker's (each worker's lines summed, e.g. a relaunch), summed
            over worker counts (jobs of different worker counts cannot overlap: the run lock);
            train_seconds / train_work_seconds the same charged to training (an evaluation counts only
            for an engine start-up it made, work 0)
  metrics   RUN/metrics.jsonl (and each replay's): run, kind ("step" / "round"), step, round, tag,
            value, the scalars of RUN/tensorboard/ (metrics.py)
  evals     one row per evaluated round (eval/round=<r>.json)

``RUN/opdcache.duckdb`` holds the same views for any DuckDB client. Views use absolute paths;
any ``opdcache`` command on the run refreshes them (after moving a run, run ``opdcache query``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import duckdb
import pyarrow as pa

from opdcache.budget import Decision
from opdcache.cache.schema import CACHE_COLUMNS, SCORE_COLUMNS, Column
from opdcache.errors import OpdcacheError
from opdcache.rundir import RunDir, round_dir

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.float32(): "FLOAT",
    pa.list_(pa.int32()): "INTEGER[]",
    pa.list_(pa.float32()): "FLOAT[]",
    pa.list_(pa.bool_()): "BOOLEAN[]",
}


def _q(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _empty(cols: list[tuple[str, str]]) -> str:
    return "SELECT " + ", ".join(f"NULL::{t} AS {n}" for n, t in cols) + " WHERE false"


def _typed(columns: tuple[Column, ...]) -> list[tuple[str, str]]:
    return [(c.name, _DUCK_TYPES[c.type]) for c in columns]


def _jsonl(files: list[Path], cols: list[tuple[str, str]], required: str) -> str:
    """A view over JSON-lines files (the run's and its replays'); a line that does not parse or lacks
    ``required`` (a torn last line after a crash) is skipped."""
    if not files:
        return _empty(cols)
    spec = ", ".join(f"{n}: '{t}'" for n, t in cols)
    return (
        f"SELECT * FROM read_json([{', '.join(_q(p) for p in files)}], format = 'newline_delimited', "
        f"columns = {{{spec}}}, ignore_errors = true) WHERE {required} IS NOT NULL"
    )


def view_statements(root: RunDir | str | Path) -> list[str]:
    run = RunDir.of(root)
    cache_glob = run.cache / round_dir("*") / "*.parquet"
    score_glob = run.scores / "*" / round_dir("*") / "*.parquet"
    has_cache = any(run.shards(run.cache_round(r)) for r in run.rounds())
    has_scores = any(
        run.shards(run.score_round(v, r)) for v in run.variants() for r in run.rounds(run.variant(v))
    )

    if has_cache:
        rollouts = (
            f"SELECT round::INTEGER AS round, * EXCLUDE (round), len(response_ids) AS response_len "
            f"FROM read_parquet({_q(cache_glob)}, hive_partitioning = true)"
        )
    else:
        rollouts = _empty([("round", "INTEGER"), *_typed(CACHE_COLUMNS), ("response_len", "BIGINT")])
    score_cols = [("variant", "VARCHAR"), ("round", "INTEGER"), *_typed(SCORE_COLUMNS)]
    if has_scores:
        scores = (
            f"SELECT regexp_extract(filename, '/scores/([^/]+)/round=', 1) AS variant, "
            f"round::INTEGER AS round, * EXCLUDE (round, filename) "
            f"FROM read_parquet({_q(score_glob)}, hive_partitioning = true, union_by_name = true, filename = true) "
            f"UNION ALL BY NAME {_empty(score_cols)}"  # so overlap and accept both always exist
        )
        variants = (
            "SELECT DISTINCT regexp_extract(file_name, '/scores/([^/]+)/round=', 1) AS variant, "
            "json_extract_string(decode(value), '$.metric') AS metric, decode(value) AS params "
            f"FROM parquet_kv_metadata({_q(score_glob)}) WHERE decode(key) = 'opdcache.variant'"
        )
    else:
        scores = _empty(score_cols)
        variants = _empty([("variant", "VARCHAR"), ("metric", "VARCHAR"), ("params", "VARCHAR")])
    tokens = """
        SELECT r.round, r.prompt_id, r.sample, s.variant,
               generate_subscripts(r.response_ids, 1) - 1 AS pos,
               unnest(r.response_ids) AS token_id,
               unnest(r.student_logprob) AS student_logprob,
               unnest(r.teacher_logprob) AS teacher_logprob,
               unnest(s.overlap) AS overlap, unnest(s.accept) AS accept, unnest(s.bad) AS bad,
               unnest(s.reliability) AS R, unnest(s.weight) AS L
        FROM rollouts r LEFT JOIN scores s USING (round, prompt_id, sample)"""
    duck = {"int": "INTEGER", "float": "DOUBLE", "str": "VARCHAR"}
    budget_cols = [(f.name, duck[str(f.type)]) for f in dataclasses.fields(Decision)]
    history = json.loads(run.budget.read_text()).get("history", []) if run.budget.exists() else []
    if history:
        budget = (
            "SELECT "
            + ", ".join(f"h.{n}::{t} AS {n}" for n, t in budget_cols)
            + f" FROM (SELECT unnest(history) AS h FROM read_json_auto({_q(run.budget)}))"
        )
    else:
        budget = _empty(budget_cols)
    time_files = [p for p in [run.stage_times, *(rep.stage_times for rep in run.replay_runs())] if p.exists()]
    time_cols = [
        ("run", "VARCHAR"),
        ("round", "INTEGER"),
        ("stage", "VARCHAR"),
        ("seconds", "DOUBLE"),
        ("work_seconds", "DOUBLE"),  # seconds less engine start-up (absent in older files: NULL)
        ("skipped", "BOOLEAN"),
        ("host", "VARCHAR"),
        ("finished_at", "DOUBLE"),
        ("generated_tokens", "BIGINT"),  # rollout stages: tokens decoded (cut-off ones included)
        ("teacher_positions", "BIGINT"),  # teacher stages and in-flight rollouts: positions scored
        ("shard", "VARCHAR"),  # "i/N": worker i of a sharded stage's N (NULL: not sharded)
    ]
    stage_times = _jsonl(time_files, time_cols, "stage")
    stage_walls = """
        WITH per_worker AS (
            SELECT run, round, stage, coalesce(split_part(shard, '/', 2)::INTEGER, 1) AS workers,
                   coalesce(split_part(shard, '/', 1)::INTEGER, 0) AS worker, sum(seconds) AS seconds,
                   sum(coalesce(work_seconds, seconds)) AS work_seconds,
                   sum(generated_tokens) AS generated_tokens, sum(teacher_positions) AS teacher_positions,
                   count(*) AS lines, bool_and(skipped) AS skipped
            FROM stage_times GROUP BY ALL
        ), per_job AS (
            SELECT run, round, stage, workers, max(seconds) AS seconds, max(work_seconds) AS work_seconds,
                   sum(generated_tokens) AS generated_tokens, sum(teacher_positions) AS teacher_positions,
                   sum(lines) AS lines, bool_and(skipped) AS skipped
            FROM per_worker GROUP BY ALL
        ), walls AS (
            SELECT run, round, stage, sum(seconds) AS seconds, sum(work_seconds) AS work_seconds,
                   sum(generated_tokens)::BIGINT AS generated_tokens,
                   sum(teacher_positions)::BIGINT AS teacher_positions, max(workers) AS workers,
                   sum(lines)::BIGINT AS lines, bool_and(skipped) AS skipped
            FROM per_job GROUP BY ALL
        )
        -- charged to training: an evaluation only for the engine start-up it made (the run's one engine
        -- then serves the rollouts too)
        SELECT *, CASE WHEN stage = 'eval' THEN seconds - work_seconds ELSE seconds END AS train_seconds,
               CASE WHEN stage = 'eval' THEN 0 ELSE work_seconds END AS train_work_seconds
        FROM walls"""
    metric_files = [p for p in [run.metrics, *(rep.metrics for rep in run.replay_runs())] if p.exists()]
    metric_cols = [
        ("run", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("step", "INTEGER"),
        ("round", "INTEGER"),
        ("tag", "VARCHAR"),
        ("value", "DOUBLE"),
    ]
    metrics = _jsonl(metric_files, metric_cols, "tag")
    eval_cols = [
        ("round", "INTEGER"),
        ("accuracy", "DOUBLE"),
        ("pass_at_n", "DOUBLE"),
        ("n", "INTEGER"),
        ("prompts", "INTEGER"),
        ("mean_response_tokens", "DOUBLE"),
        ("truncated", "DOUBLE"),
        ("seconds", "DOUBLE"),
        ("boxed_rate", "DOUBLE"),  # NULL in results written before it was recorded
        ("stop_rate", "DOUBLE"),
        ("horizon", "DOUBLE"),  # checker chain only
        ("topk_kl", "DOUBLE"),  # the distillation metrics: NULL without eval.teacher
        ("teacher_nll", "DOUBLE"),
        ("student_nll", "DOUBLE"),
        ("sample_kl", "DOUBLE"),
        ("full_kl", "DOUBLE"),
        ("student_entropy", "DOUBLE"),  # NULL in results written before it was recorded
        ("teacher_entropy", "DOUBLE"),
        ("overlap", "DOUBLE"),
        ("band", "INTEGER"),
        ("overlap_by_band", "MAP(VARCHAR, DOUBLE)"),
        ("kl_by_band", "MAP(VARCHAR, DOUBLE)"),
    ]
    eval_glob = run.eval_result("*")
    if any(eval_glob.parent.glob(eval_glob.name)):
        cols = ", ".join(f"{n}: '{t}'" for n, t in eval_cols[1:])
        evals = (
            f"SELECT regexp_extract(filename, 'round=([0-9]+)', 1)::INTEGER AS round, * EXCLUDE (filename) "
            f"FROM read_json({_q(eval_glob)}, columns = {{{cols}}}, filename = true)"
        )
    else:
        evals = _empty(eval_cols)
    views = {
        "rollouts": rollouts,
        "scores": scores,
        "tokens": tokens,
        "variants": variants,
        "budget": budget,
        "stage_times": stage_times,
        "stage_walls": stage_walls,
        "evals": evals,
        "metrics": metrics,
    }
    return [f"CREATE OR REPLACE VIEW {name} AS {sql}" for name, sql in views.items()]


def connect(root: RunDir | str | Path, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the run's views defined."""
    RunDir.of(root).require()
    con = duckdb.connect(database)
    for stmt in view_statements(root):
        con.execute(stmt)
    return con


def refresh_duckdb_file(root: RunDir | str | Path) -> Path | None:
    """(Re)write RUN/opdcache.duckdb with current views; None if a client holds it open."""
    run = RunDir.of(root)
    tmp = run.root / f".opdcache.duckdb.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        connect(root, str(tmp)).close()
        os.replace(tmp, run.duckdb)
    except (duckdb.Error, OSError):
        return None
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
    return run.duckdb


# statements that only read: anything else (COPY ... TO, CREATE, DROP, ATTACH, EXPORT, INSTALL, ...)
# needs write=True (opdcache query --write)
READ_ONLY = {"SELECT", "EXPLAIN", "SET", "VARIABLE_SET", "PRAGMA"}


def run_sql(
    root: RunDir | str | Path, sql: str, params: dict[str, str] | None = None, write: bool = False
) -> duckdb.DuckDBPyRelation | None:
    """Run ``sql`` (one or more statements) against the run's views; returns the last result. Only
    statements that read are run unless ``write`` (the views are the project's, files the user's)."""
    if not write:
        for stmt in duckdb.connect().extract_statements(sql):
            kind = stmt.type.name
            if kind not in READ_ONLY:
                text = " ".join(stmt.query.split())[:60]
                raise OpdcacheError(
                    f"query: {kind} statement refused ({text!r}): queries are read-only; "
                    "pass --write to run statements that create, change or write files"
                )
    con = connect(root)
    for name, value in (params or {}).items():
        con.execute(f"SET VARIABLE {name} = ?", [_param_value(value)])
    statements = [s for s in _split_statements(sql) if s.strip()]
    for stmt in statements[:-1]:
        con.execute(stmt).fetchall()  # earlier results are dropped; unfetched, they block the next one
    return con.sql(statements[-1]) if statements else None


def _param_value(value: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _split_statements(sql: str) -> list[str]:
    con = duckdb.connect()
    return [str(s.query) for s in con.extract_statements(sql)]
