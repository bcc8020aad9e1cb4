"""DuckDB views over a run, the shipped analysis SQL, and the RUN/opdcache.duckdb file."""

from pathlib import Path

import duckdb
import numpy as np
import pytest

from opdcache.budget import BudgetController
from opdcache.cache.shards import flat, read_cache_shard
from opdcache.query import connect, refresh_duckdb_file, run_sql
from opdcache.score.stage import read_effective_lengths, score_run
from opdcache.variant import VariantSpec

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


@pytest.fixture
def scored(synth_run):
    score_run(synth_run, "prune", VariantSpec(), progress=False)
    score_run(synth_run, "tp", VariantSpec(metric="top_p"), progress=False)
    ctl = BudgetController(synth_run.root)
    for r in (0, 1):
        ctl.update(r, read_effective_lengths(synth_run, "prune", r))
    return synth_run


def _positions(run):
    return sum(
        len(flat(read_cache_shard(p, ["response_ids"])[0].column("response_ids"))[0])
        for r in run.rounds()
        for p in run.shards(run.cache_round(r))
    )


def test_views_agree_with_files(scored):
    con = connect(scored.root)
    n = _positions(scored)
    assert con.execute("select count(*) from rollouts").fetchone()[0] == 48
    assert con.execute("select count(*) from tokens where variant = 'prune'").fetchone()[0] == n
    assert (
        con.execute("select count(*) from tokens where variant = 'tp' and accept is not null").fetchone()[0]
        == n
    )
    e_sql = con.execute("select effective_len from scores where variant='prune' and round=0").fetchnumpy()
    np.testing.assert_array_equal(
        np.sort(e_sql["effective_len"]), np.sort(read_effective_lengths(scored, "prune", 0))
    )
    # per-position values line up with the cache: weight at pos equals R + 0.5, R non-increasing
    rows = con.execute("""select prompt_id, sample, pos, token_id, R, L from tokens
                      where variant='prune' and round=1 order by prompt_id, sample, pos""").fetchall()
    assert all(abs(L - (R + 0.5)) < 1e-6 for *_, R, L in rows)
    assert {r[0] for r in con.execute("select variant from variants").fetchall()} == {"prune", "tp"}
    budget = con.execute("select round, max_tokens, next_max_tokens from budget order by round").fetchall()
    assert [b[0] for b in budget] == [0, 1] and budget[1][1] == budget[0][2]


def test_tokens_with_no_scores_yet(synth_run):
    con = connect(synth_run.root)
    n = _positions(synth_run)
    assert con.execute("select count(*), count(variant) from tokens").fetchone() == (n, 0)
    assert con.execute("select count(*) from budget").fetchone()[0] == 0


@pytest.mark.parametrize("sql_file", sorted(ANALYSIS.glob("*.sql")), ids=lambda p: p.name)
def test_analysis_sql_runs(scored, sql_file):
    rows = run_sql(scored.root, sql_file.read_text(), {"band_scale": "100", "bucket": "64"}).fetchall()
    # the fixture has no evaluations (tests/test_report_on_cpu.py has)
    if sql_file.name in (
        "accuracy_vs_time.sql",
        "distill_vs_time.sql",
        "eval_overlap_by_depth.sql",
        "outcome_per_round.sql",
    ):
        assert rows == []
    else:
        assert rows


def test_overlap_by_depth_shows_drift(scored):
    rows = run_sql(
        scored.root, (ANALYSIS / "overlap_by_depth.sql").read_text(), {"band_scale": "50"}
    ).fetchall()
    by_band = {(r, band): o for r, band, _, o, _ in rows}
    assert by_band[(0, "0-50")] > by_band[(0, "200-250")] + 0.05  # the fixture drifts with depth
    # contiguous bands: every scored position of the chosen variant is counted once
    total = run_sql(scored.root, "select count(*) from tokens where variant = 'prune'").fetchall()[0][0]
    assert sum(n for *_, n in rows) == total
    starts = [start for r, _, start, _, _ in rows if r == 0]
    assert starts == list(range(0, 50 * len(starts), 50)) and len(starts) >= 5


def test_duckdb_file_for_other_clients(scored):
    path = refresh_duckdb_file(scored.root)
    con = duckdb.connect(str(path), read_only=True)
    views = {r[0] for r in con.execute("select view_name from duckdb_views() where not internal").fetchall()}
    assert {"rollouts", "scores", "tokens", "variants", "budget"} <= views
    assert con.execute("select count(*) from rollouts").fetchone()[0] == 48


VIEWS = (
    "rollouts",
    "scores",
    "tokens",
    "variants",
    "budget",
    "stage_times",
    "stage_walls",
    "evals",
    "metrics",
)


def test_read_only_views_are_the_file_views(scored):
    """connect(read_only=True) reads Arrow objects, connect() the files: the same rows in every view."""
    ro, rw = connect(scored.root, read_only=True), connect(scored.root)
    for view in VIEWS:
        cols = [c[0] for c in rw.execute(f"DESCRIBE {view}").fetchall()]
        assert [c[0] for c in ro.execute(f"DESCRIBE {view}").fetchall()] == cols, view
        q = f"SELECT {', '.join(cols)} FROM {view} ORDER BY ALL"
        assert ro.execute(q).fetchall() == rw.execute(q).fetchall(), view
    assert ro.execute("SELECT count(*) FROM tokens").fetchone()[0] > 0


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# every kind of statement DuckDB has that reads or writes a file or changes where output goes; {run}
# is the run folder, {out} a path outside it
WRITING = [
    "COPY (SELECT 1 AS x) TO '{out}/x.csv'",
    "COPY (SELECT 1 AS x) TO '{run}/budget.json' (FORMAT json)",
    "COPY (SELECT * FROM rollouts) TO '{run}/cache/round=0/part-00000.parquet' (FORMAT parquet)",
    "COPY rollouts TO '{out}/r.parquet'",
    "CREATE TABLE t (x INT); COPY t FROM '{run}/budget.json'",
    "EXPORT DATABASE '{out}/exp'",
    "EXPORT DATABASE '{run}/cache'",
    "ATTACH '{out}/x.db' AS x",
    "ATTACH '{run}/opdcache.duckdb' AS x",
    "SET log_query_path = '{run}/budget.json'",
    "SET profiling_output = '{run}/budget.json'",
    "PRAGMA enable_profiling = 'json'",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET lock_configuration",
    "SET temp_directory = '{run}/cache'",
    "CALL enable_logging(storage = 'file', storage_path = '{run}/logs')",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{run}/x.csv'",
    "EXPLAIN ANALYZE CREATE TABLE x AS SELECT * FROM read_json('{run}/budget.json')",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT * FROM read_csv('{run}/stage_times.jsonl')",
    "SELECT * FROM '{run}/cache/round=0/part-00000.parquet'",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('{run}/*')",
    "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "CHECKPOINT",
]


@pytest.mark.parametrize("sql", WRITING)
def test_query_cannot_write(scored, tmp_path, sql):
    """Each statement is refused with the --write hint, the run's bytes unchanged, nothing written."""
    from opdcache.errors import OpdcacheError

    refresh_duckdb_file(scored.root)
    before = _bytes(scored.root)
    out = tmp_path / "out"
    out.mkdir()
    text = sql.format(run=scored.root, out=out)
    try:
        rel = run_sql(scored.root, text)
        result = rel.fetchall() if rel is not None else None
    except OpdcacheError as e:
        assert "read-only" in str(e) and "--write" in str(e)
    except duckdb.Error as e:  # refused by DuckDB in another words (e.g. an extension it cannot load)
        assert "Permission" in str(e) or "external access" in str(e).lower() or "lock" in str(e).lower(), e
    else:
        # CHECKPOINT of an in-memory database and the like: allowed, and they touch no file
        assert sql == "CHECKPOINT", (sql, result)
    assert _bytes(scored.root) == before
    assert list(out.iterdir()) == []
