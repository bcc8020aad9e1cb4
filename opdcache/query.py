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

``run_sql`` (``opdcache query``, the report, the demos) is read-only unless asked: its connection reads
the run through registered Arrow objects and may touch no file (``connect(read_only=True)``).
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
from opdcache.cache.shards import check_run_parts, find_failing_page
from opdcache.errors import CacheFormatError, OpdcacheError
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


TIME_COLUMNS = [
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
BUDGET_COLUMNS = [
    (f.name, {"int": "INTEGER", "float": "DOUBLE", "str": "VARCHAR"}[str(f.type)])
    for f in dataclasses.fields(Decision)
]
METRIC_COLUMNS = [
    ("run", "VARCHAR"),
    ("kind", "VARCHAR"),
    ("step", "INTEGER"),
    ("round", "INTEGER"),
    ("tag", "VARCHAR"),
    ("value", "DOUBLE"),
]
EVAL_COLUMNS = [
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


def file_sources(run: RunDir) -> dict[str, str | None]:
    """FROM-expressions over the run's files, one per source of the views (None: no such file yet).
    ``cache`` has the cache columns and ``round``; ``scores`` the score columns, ``variant`` and
    ``round``; the others are whole tables of their view's columns."""
    cache_glob = run.cache / round_dir("*") / "*.parquet"
    score_glob = run.scores / "*" / round_dir("*") / "*.parquet"
    out: dict[str, str | None] = dict.fromkeys(("cache", "scores", "variants", "budget", "evals"))
    if any(run.shards(run.cache_round(r)) for r in run.rounds()):
        out["cache"] = f"read_parquet({_q(cache_glob)}, hive_partitioning = true)"
    if any(run.shards(run.score_round(v, r)) for v in run.variants() for r in run.rounds(run.variant(v))):
        out["scores"] = (
            "(SELECT regexp_extract(filename, '/scores/([^/]+)/round=', 1) AS variant, * EXCLUDE (filename) "
            f"FROM read_parquet({_q(score_glob)}, hive_partitioning = true, union_by_name = true, filename = true))"
        )
        out["variants"] = (
            "(SELECT DISTINCT regexp_extract(file_name, '/scores/([^/]+)/round=', 1) AS variant, "
            "json_extract_string(decode(value), '$.metric') AS metric, decode(value) AS params "
            f"FROM parquet_kv_metadata({_q(score_glob)}) WHERE decode(key) = 'opdcache.variant')"
        )
    history = []
    if run.budget.exists():
        try:
            history = json.loads(run.budget.read_text()).get("history", [])
        except (ValueError, AttributeError) as e:
            raise CacheFormatError(f"{run.budget}: unreadable budget state ({e})") from e
    if history:
        out["budget"] = (
            "(SELECT "
            + ", ".join(f"h.{n}::{t} AS {n}" for n, t in BUDGET_COLUMNS)
            + f" FROM (SELECT unnest(history) AS h FROM read_json_auto({_q(run.budget)})))"
        )
    times = [p for p in [run.stage_times, *(rep.stage_times for rep in run.replay_runs())] if p.exists()]
    out["stage_times"] = f"({_jsonl(times, TIME_COLUMNS, 'stage')})"
    metrics = [p for p in [run.metrics, *(rep.metrics for rep in run.replay_runs())] if p.exists()]
    out["metrics"] = f"({_jsonl(metrics, METRIC_COLUMNS, 'tag')})"
    eval_glob = run.eval_result("*")
    if any(eval_glob.parent.glob(eval_glob.name)):
        cols = ", ".join(f"{n}: '{t}'" for n, t in EVAL_COLUMNS[1:])
        out["evals"] = (
            "(SELECT regexp_extract(filename, 'round=([0-9]+)', 1)::INTEGER AS round, * EXCLUDE (filename) "
            f"FROM read_json({_q(eval_glob)}, columns = {{{cols}}}, filename = true))"
        )
    return out


def arrow_sources(run: RunDir, con: duckdb.DuckDBPyConnection) -> dict[str, str | None]:
    """The same sources registered on ``con`` as Arrow objects, so that its views read no file through
    DuckDB: the cache and the scores as lazy Parquet datasets, the small JSON sources read here."""
    import pyarrow.dataset as ds

    files = file_sources(run)
    out: dict[str, str | None] = dict.fromkeys(files)
    hive = ds.partitioning(flavor="hive")

    # every page's CRC checked as it is decoded, as the stages' own readers do
    fmt = ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
    )

    def dataset(base: Path) -> ds.Dataset | None:
        parts = [p for r in run.rounds(base) for p in run.shards(base / round_dir(r))]
        return (
            ds.dataset(parts, format=fmt, partitioning=hive, partition_base_dir=str(base)) if parts else None
        )

    check_run_parts(run)  # a damaged, foreign or lost part is one error naming it, not a DuckDB traceback

    if files["cache"] and (data := dataset(run.cache)) is not None:
        con.register("_cache", data)
        out["cache"] = "_cache"
    selects = []
    for i, v in enumerate(run.variants()):
        if (data := dataset(run.variant(v))) is not None:
            con.register(f"_scores_{i}", data)
            selects.append(f"SELECT {_q(v)} AS variant, * FROM _scores_{i}")
    if files["scores"] and selects:
        out["scores"] = "(" + " UNION ALL BY NAME ".join(selects) + ")"
    reader = duckdb.connect()  # a private connection that may read files; no user statement runs on it
    for name in ("variants", "budget", "stage_times", "metrics", "evals"):
        if files[name]:
            con.register(f"_{name}", reader.sql(f"SELECT * FROM {files[name]}").to_arrow_table())
            out[name] = f"_{name}"
    reader.close()
    return out


def view_statements(root: RunDir | str | Path, sources: dict[str, str | None] | None = None) -> list[str]:
    """CREATE VIEW statements of the module docstring's views over ``sources`` (default: the run's
    files, ``file_sources``; ``arrow_sources`` for a connection that may read no file)."""
    src = file_sources(RunDir.of(root)) if sources is None else sources

    def table(name: str, cols: list[tuple[str, str]]) -> str:
        return f"SELECT * FROM {src[name]}" if src[name] else _empty(cols)

    if src["cache"]:
        rollouts = (
            "SELECT round::INTEGER AS round, * EXCLUDE (round), len(response_ids) AS response_len "
            f"FROM {src['cache']}"
        )
    else:
        rollouts = _empty([("round", "INTEGER"), *_typed(CACHE_COLUMNS), ("response_len", "BIGINT")])
    score_cols = [("variant", "VARCHAR"), ("round", "INTEGER"), *_typed(SCORE_COLUMNS)]
    scores = _empty(score_cols)
    if src["scores"]:
        scores = (
            f"SELECT variant, round::INTEGER AS round, * EXCLUDE (variant, round) FROM {src['scores']} "
            f"UNION ALL BY NAME {scores}"  # so overlap and accept both always exist
        )
    tokens = """
        SELECT r.round, r.prompt_id, r.sample, s.variant,
               generate_subscripts(r.response_ids, 1) - 1 AS pos,
               unnest(r.response_ids) AS token_id,
               unnest(r.student_logprob) AS student_logprob,
               unnest(r.teacher_logprob) AS teacher_logprob,
               unnest(s.overlap) AS overlap, unnest(s.accept) AS accept, unnest(s.bad) AS bad,
               unnest(s.reliability) AS R, unnest(s.weight) AS L
        FROM rollouts r LEFT JOIN scores s USING (round, prompt_id, sample)"""
    variants = table("variants", [("variant", "VARCHAR"), ("metric", "VARCHAR"), ("params", "VARCHAR")])
    budget = table("budget", BUDGET_COLUMNS)
    stage_times = table("stage_times", TIME_COLUMNS)
    metrics = table("metrics", METRIC_COLUMNS)
    evals = table("evals", EVAL_COLUMNS)
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


def connect(
    root: RunDir | str | Path, database: str = ":memory:", read_only: bool = False
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the run's views defined. ``read_only``: the views read Arrow objects
    registered here (``arrow_sources``) and the connection may then touch no file at all (DuckDB's
    ``enable_external_access`` off, its configuration locked): no statement on it can change the run
    or write anywhere."""
    run = RunDir.of(root)
    run.require()
    con = duckdb.connect(database)
    for stmt in view_statements(run, arrow_sources(run, con) if read_only else None):
        con.execute(stmt)
    if read_only:
        # one thread: sums over the Arrow scans in a fixed order, so a report's figures are byte-identical
        con.execute("SET threads = 1")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
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


def run_sql(
    root: RunDir | str | Path, sql: str, params: dict[str, str] | None = None, write: bool = False
) -> duckdb.DuckDBPyRelation | None:
    """Run ``sql`` (one or more statements) against the run's views; returns the last result. Without
    ``write`` the connection is ``connect(read_only=True)``'s: a statement that would read or write a
    file (COPY, EXPORT, ATTACH, INSTALL, a profiling or log output, ...) is refused by DuckDB itself."""
    con = connect(root, read_only=not write)
    for name, value in (params or {}).items():
        con.execute(f"SET VARIABLE {name} = ?", [_param_value(value)])
    statements = [s for s in _split_statements(sql) if s.strip()]
    try:
        for stmt in statements[:-1]:
            con.execute(stmt).fetchall()  # earlier results are dropped; unfetched, they block the next one
        return con.sql(statements[-1]) if statements else None
    except (duckdb.PermissionException, duckdb.InvalidInputException) as e:
        if write or not isinstance(e, duckdb.PermissionException) and "configuration" not in str(e):
            raise
        raise OpdcacheError(
            f"query: refused, queries are read-only ({str(e).splitlines()[0]}); "
            "pass --write to run statements that touch files or settings"
        ) from e


def read_error(root: RunDir | str | Path, e: Exception) -> OpdcacheError:
    """A DuckDB error raised while a query read the run, in the user's terms: a page that fails its
    checksum is named (DuckDB names only the registered stream), other errors pass as they are."""
    first = str(e).splitlines()[0]
    if "registered as" in first or "checksum" in first.lower():
        run = RunDir.of(root)
        if bad := find_failing_page([p for _, _, p in run.parts()]):
            return CacheFormatError(f"{bad}: a page fails its checksum ({first.split(': ')[-1]})")
    return OpdcacheError(f"query failed: {first}")


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
