"""`opdcache probe` on the tiny pair: every printed figure restated from the cache by hand (numpy over
the Parquet parts, eqs. 6-12 written out here), and the verdict's rule on hand-made figures."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from opdcache.cli import main
from opdcache.probe import CALIBRATION_TOKENS, DROP_MIN, LATE_RATIO, VariantView, verdict_of
from opdcache.rundir import RunDir


def _view(drop: float, early: float, late: float) -> VariantView:
    ratio = late / early if early else float("inf")  # as variant_view states it: late drift, none early
    return VariantView(0.7, 0.01, (early + late) / 2, early, late, ratio, 10.0, drop)


def test_verdict_rule_on_hand_made_figures():
    assert verdict_of(_view(DROP_MIN / 2, 0.1, 0.9)) == "little"  # nothing to drop decides first
    assert verdict_of(_view(0.4, 0.1, 0.1 * LATE_RATIO * 1.01)) == "late"
    assert verdict_of(_view(0.4, 0.2, 0.2 * LATE_RATIO * 0.99)) == "uniform"
    assert verdict_of(_view(0.4, 0.0, 0.3)) == "late"  # no early drift at all


@pytest.mark.slow
def test_probe_figures_restated_from_the_cache(models, tmp_path, capsys):
    out = tmp_path / "probe"
    w_drop = 0.1  # R reaches 0 after 10 bad events, inside 48 tokens
    argv = ["probe", str(out), "--teacher", str(models / "teacher"), "--student", str(models / "student"),
            "--data", str(models / "prompts.jsonl"), "--n", "6", "--max-tokens", "48", "--w-drop", str(w_drop),
            "--set", "rollout.k=8", "--set", "rollout.kv_cache_gib=1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "probe" / "probe.json").read_text())
    assert (out / "probe" / "probe.png").stat().st_size > 0
    run = RunDir(out)
    rows = [pq.read_table(p).to_pylist() for p in run.shards(run.cache_round(0))]
    rows = [r for part in rows for r in part]
    assert len(rows) == 6 == res["responses"]
    k = 8
    overlaps, early = [], []
    for r in rows:
        s, t = np.array(r["student_topk_ids"]).reshape(-1, k), np.array(r["teacher_topk_ids"]).reshape(-1, k)
        o = np.array([len(set(a) & set(b)) / k for a, b in zip(s, t, strict=True)])
        overlaps.append(o)
        early += list(o[:CALIBRATION_TOKENS])
    gamma = float(np.quantile(early, 0.5))
    assert res["suggested_gamma"] == pytest.approx(gamma, abs=1e-6)
    assert res["used"]["gamma"] == pytest.approx(gamma, abs=1e-6)
    kept = total = 0
    bad_first = bad_last = n_first = n_last = 0
    for o in overlaps:
        bad = (o < np.float32(gamma)).astype(int)
        c = np.cumsum(bad)
        rel = np.clip(1 - w_drop * c, 0, 1)
        kept += int((rel > 1e-8).sum())
        total += len(o)
        n = len(o)
        first = [i for i in range(n) if 3 * i < n]
        last = [i for i in range(n) if 3 * i >= 2 * n]
        bad_first += bad[first].sum()
        n_first += len(first)
        bad_last += bad[last].sum()
        n_last += len(last)
    drop = 1 - kept / total
    assert res["used"]["drop_share"] == pytest.approx(drop, abs=1e-9)
    assert res["used"]["mean_e"] == pytest.approx(kept / 6)
    assert res["used"]["bad_early"] == pytest.approx(bad_first / n_first)
    assert res["used"]["bad_late"] == pytest.approx(bad_last / n_last)
    assert res["mean_length"] == pytest.approx(total / 6)
    want = (
        "little"
        if drop < DROP_MIN
        else ("late" if bad_last / n_last >= LATE_RATIO * bad_first / n_first else "uniform")
    )
    assert res["verdict_key"] == want
    assert res["verdict"] in printed
    # a run folder SQL reads: the probe's own variants are views
    assert (
        main(
            [
                "query",
                str(out),
                "select variant, count(*) from scores group by 1 order by 1",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert "paper,6" in capsys.readouterr().out
