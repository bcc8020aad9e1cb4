"""The score stage on synthetic caches: correctness, variants, idempotence, atomic replacement."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from opdcache.cache.schema import VARIANT_META_KEY, CacheMeta
from opdcache.cache.shards import flat, read_cache_shard, write_cache_shard
from opdcache.cache.synthetic import synthetic_columns
from opdcache.errors import CacheFormatError, OpdcacheError
from opdcache.rundir import RunDir
from opdcache.score import reliability as rl
from opdcache.score import stage
from opdcache.score.stage import read_effective_lengths, score_run
from opdcache.score.torch_reference import prune_opd_weights
from opdcache.variant import VariantSpec


def _score_tables(run, name, r):
    d = run.variant(name) / f"round={r}"
    return {p.name: pq.read_table(p) for p in run.shards(d)}


def test_scores_match_torch_reference(synth_run):
    score_run(synth_run, "prune", VariantSpec(gamma=0.7, w_drop=0.05), progress=False)
    for r in (0, 1):
        for part in synth_run.shards(synth_run.cache_round(r)):
            cache, meta = read_cache_shard(part)
            score = pq.read_table(synth_run.variant("prune") / f"round={r}" / part.name)
            assert score.column("prompt_id").to_pylist() == cache.column("prompt_id").to_pylist()
            lengths = np.diff(flat(cache.column("response_ids"))[1])
            b, t, k = len(lengths), int(lengths.max()), meta.k
            mask = np.arange(t)[None, :] < lengths[:, None]
            dense = {}
            for name in ("student_topk_ids", "teacher_topk_ids"):
                x = np.zeros((b, t, k), dtype=np.int64) - 1
                x[mask] = flat(cache.column(name))[0].reshape(-1, k)
                dense[name] = torch.from_numpy(x)
            ref = prune_opd_weights(
                dense["student_topk_ids"],
                dense["teacher_topk_ids"],
                torch.from_numpy(mask),
                gamma=0.7,
                w_drop=0.05,
            )
            for col, key in (("overlap", "overlap"), ("reliability", "reliability"), ("weight", "weight")):
                got = score.column(col).to_pylist()
                for i in range(b):
                    np.testing.assert_allclose(got[i], ref[key][i, : lengths[i]].numpy(), atol=1e-6)
            np.testing.assert_array_equal(
                score.column("effective_len").to_numpy(), ref["effective_len"].numpy()
            )


def test_drift_makes_reliability_fall(synth_run):
    summaries = score_run(synth_run, "prune", VariantSpec(), progress=False).rounds
    assert all(0.0 < s.retained_fraction < 1.0 for s in summaries)
    e = read_effective_lengths(synth_run, "prune", 0)
    assert len(e) == 24 and e.max() < 512


def test_variant_metadata_describes_itself(synth_run):
    score_run(synth_run, "g8", VariantSpec(gamma=0.8, w_base=0.25), progress=False)
    for table in _score_tables(synth_run, "g8", 0).values():
        meta = json.loads(table.schema.metadata[VARIANT_META_KEY])
        assert meta == {"metric": "overlap", "gamma": 0.8, "w_drop": 0.01, "w_base": 0.25, "eps": 1e-8}


def test_rescoring_is_idempotent_and_replaces(synth_run):
    score_run(synth_run, "v", VariantSpec(), progress=False)
    first = _score_tables(synth_run, "v", 1)
    score_run(synth_run, "v", VariantSpec(), progress=False)
    assert all(first[n].equals(t) for n, t in _score_tables(synth_run, "v", 1).items())
    score_run(synth_run, "v", VariantSpec(gamma=0.9), progress=False)
    assert not all(first[n].equals(t) for n, t in _score_tables(synth_run, "v", 1).items())
    assert not list(synth_run.staging.iterdir())
    assert sorted(p.name for p in synth_run.scores.iterdir()) == ["v"]


def test_partial_rescore(synth_run):
    score_run(synth_run, "v", VariantSpec(), progress=False)
    before = _score_tables(synth_run, "v", 0)
    score_run(synth_run, "v", VariantSpec(), rounds=[1], progress=False)
    assert all(before[n].equals(t) for n, t in _score_tables(synth_run, "v", 0).items())
    with pytest.raises(OpdcacheError, match="would mix settings"):
        score_run(synth_run, "v", VariantSpec(gamma=0.5), rounds=[1], progress=False)
    with pytest.raises(OpdcacheError, match=r"rounds \[7\] are not in"):
        score_run(synth_run, "v", VariantSpec(), rounds=[7], progress=False)


def test_crash_leaves_old_variant_and_no_partial(synth_run, monkeypatch):
    score_run(synth_run, "v", VariantSpec(), progress=False)
    before = _score_tables(synth_run, "v", 0)
    calls = {"n": 0}
    real = stage.score_shard

    def crash_on_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(stage, "score_shard", crash_on_third)
    with pytest.raises(RuntimeError):
        score_run(synth_run, "v", VariantSpec(gamma=0.9), progress=False)
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        score_run(synth_run, "fresh", VariantSpec(), progress=False)
    assert all(before[n].equals(t) for n, t in _score_tables(synth_run, "v", 0).items())
    assert not synth_run.variant("fresh").exists()
    assert not list(synth_run.staging.iterdir())


def test_none_variant(synth_run):
    score_run(synth_run, "opd", VariantSpec(metric="none"), progress=False)
    for table in _score_tables(synth_run, "opd", 0).values():
        w = flat(table.column("weight"))[0]
        assert (w == 1).all() and not flat(table.column("bad"))[0].any()
        lengths = np.diff(flat(table.column("weight"))[1])
        np.testing.assert_array_equal(table.column("effective_len").to_numpy(), lengths)


def test_top_p_variant_has_accept_not_overlap(synth_run):
    score_run(synth_run, "tp", VariantSpec(metric="top_p", top_p=0.9), progress=False)
    for table in _score_tables(synth_run, "tp", 0).values():
        assert "accept" in table.column_names and "overlap" not in table.column_names
        acc, bad = flat(table.column("accept"))[0], flat(table.column("bad"))[0]
        np.testing.assert_array_equal(acc, ~bad)


@pytest.mark.parametrize("match", ["fraction", "mass"])
def test_random_variant_matches_reference(synth_run, match):
    score_run(synth_run, "prune", VariantSpec(), progress=False)
    out = score_run(
        synth_run,
        f"rand-{match}",
        VariantSpec(metric="random", reference="prune", match=match),
        progress=False,
    )
    for s in out.rounds:
        n = s.positions
        tol = 1.0 / n if match == "fraction" else 0.02
        assert abs(s.match["achieved"] - s.match["target"]) <= tol
        assert 0 < s.match["target"] < 1
    # independent of compatibility: kept rate is similar on low- and high-overlap positions
    kept, ov = [], []
    for r in (0, 1):
        for t in _score_tables(synth_run, f"rand-{match}", r).values():
            kept.append(~flat(t.column("bad"))[0])
            ov.append(flat(t.column("overlap"))[0])
    kept, ov = np.concatenate(kept), np.concatenate(ov)
    lo, hi = kept[ov < 0.7].mean(), kept[ov >= 0.7].mean()
    assert abs(lo - hi) < 0.1
    prune_kept = np.concatenate(
        [
            flat(t.column("reliability"))[0] > 0
            for r in (0, 1)
            for t in _score_tables(synth_run, "prune", r).values()
        ]
    )
    assert prune_kept[ov < 0.7].mean() < prune_kept[ov >= 0.7].mean() - 0.1  # prune does depend on it


def test_random_needs_scored_reference(synth_run):
    with pytest.raises(OpdcacheError, match="reference variant 'prune' has no scores"):
        score_run(synth_run, "rand", VariantSpec(metric="random", reference="prune"), progress=False)


def test_mixed_k_is_refused(synth_run):
    cols = synthetic_columns(2, k=4, vocab=500, mean_len=20, max_tokens=40)
    write_cache_shard(synth_run.cache_round(1) / "part-00009.parquet", cols, CacheMeta(k=4))
    with pytest.raises(CacheFormatError, match="disagree on k: k=8 in .* k=4 in"):
        score_run(synth_run, "v", VariantSpec(), progress=False)


def test_corrupt_shard_names_the_file(synth_run):
    part = synth_run.shards(synth_run.cache_round(1))[0]
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(CacheFormatError, match=str(part)):
        score_run(synth_run, "v", VariantSpec(), progress=False)
    assert not synth_run.variant("v").exists()


def test_bad_variant_name(synth_run):
    with pytest.raises(OpdcacheError, match="variant name '../x'"):
        score_run(synth_run, "../x", VariantSpec(), progress=False)


def test_no_cache(tmp_path):
    with pytest.raises(OpdcacheError, match="no cache rounds"):
        score_run(RunDir(tmp_path), "v", VariantSpec(), progress=False)


def test_shard_scores_agree_with_math_directly(synth_run):
    part = synth_run.shards(synth_run.cache_round(0))[0]
    table, meta = read_cache_shard(part)
    s = stage.score_shard(table, meta.k, VariantSpec(w_drop=0.02))
    tokens, offsets = flat(table.column("response_ids"))
    o = rl.topk_overlap(
        flat(table.column("student_topk_ids"))[0].reshape(-1, meta.k),
        flat(table.column("teacher_topk_ids"))[0].reshape(-1, meta.k),
    )
    np.testing.assert_array_equal(s.metric_values, o)
    np.testing.assert_array_equal(s.rel, rl.reliability(rl.cumulative_bad(o < 0.7, offsets), 0.02))


@pytest.mark.parametrize("spec", [VariantSpec(gamma=0.7, w_drop=0.05), VariantSpec(metric="top_p")])
def test_parallel_workers_write_the_same_bytes(synth_run, spec):
    """score.workers: parts scored at once in threads; every file and each round's summary as with one."""
    one = score_run(synth_run, "w1", spec, progress=False, workers=1)
    many = score_run(synth_run, "w4", spec, progress=False, workers=4)
    assert sum(len(synth_run.shards(synth_run.cache_round(r))) for r in (0, 1)) > 2  # something to share
    for r in (0, 1):
        a, b = synth_run.score_round("w1", r), synth_run.score_round("w4", r)
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for n in names:
            if n.endswith(".parquet"):
                assert (a / n).read_bytes() == (b / n).read_bytes(), n
    for x, y in zip(one.rounds, many.rounds, strict=True):
        fields = ("responses", "positions", "mean_metric", "retained_fraction", "effective_len_mean")
        assert [getattr(x, f) for f in fields] == [getattr(y, f) for f in fields]
