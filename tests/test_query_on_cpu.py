"""DuckDB views over a run, the shipped analysis SQL, and the RUN/opdcache.duckdb file."""

from pathlib import Path

import duckdb
import numpy as np
import pytest

from opdcache.budget import BudgetController
from opdcache.cache.shards import flat, read_cache_shard
from opdcache.query import connect, refresh_duckdb_file, run_sql
from opdcache.score.stage import read_effective_lengths, score_run
from opdcache.score.variant import VariantSpec

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
