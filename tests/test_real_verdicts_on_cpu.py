"""analysis/demo/real_verdicts.sql on a hand-made real-demo directory: every figure restated by hand,
with the seeds as the replicates (issue 30)."""

import json

import numpy as np
import pytest

from opdcache.demos.runner import verdicts

P = 4  # probe prompts


def _kl(seed, start, drop):
    """Per-prompt values: a start that varies with the seed and a final ``drop`` lower, prompt-dependent."""
    s = np.array([1.2, 1.0, 1.4, 1.1]) + 0.05 * seed
    return list(s * start), list(s * start - drop - 0.03 * np.arange(P) * (1 + seed))


# run -> seed -> (start, drop) of the full KL; the top-k KL and teacher NLL derive from it below
RUNS = {
    "low-opd.student-topk": {0: (1.0, 0.10), 1: (1.0, 0.05), 2: (1.0, 0.12)},
    "low-opd.bucket": {0: (1.0, 0.60), 1: (1.0, 0.55), 2: (1.0, 0.62)},
    "low-prune.bucket": {0: (1.0, 0.58), 1: (1.0, 0.50), 2: (1.0, 0.61)},
    "low-truncate.bucket": {0: (1.0, 0.20)},  # one seed: no verdict
}
WALL = {
    "low-opd.student-topk": 100.0,
    "low-opd.bucket": 110.0,
    "low-prune.bucket": 55.0,
    "low-truncate.bucket": 40.0,
}


TEACHER_ACC = np.array([0.75, 0.5, 0.5, 1.0])  # per probe prompt (Avg@n)
GAIN = {
    "low-opd.student-topk": 0.1,
    "low-opd.bucket": 0.7,
    "low-prune.bucket": 0.6,
    "low-truncate.bucket": 0.2,
}


def _acc(name, seed):
    """Per-prompt accuracy at round 0 (one checkpoint: the same in every run of a seed) and at the end:
    the run closes its GAIN of the gap to the teacher, with seed-dependent noise."""
    start = np.array([0.0, 0.25, 0.0, 0.25]) + 0.0625 * (seed == 1)
    final = start + GAIN[name] * (TEACHER_ACC - start) + 0.0625 * seed * np.array([1, -1, 0, 1])
    return list(start), list(final)


@pytest.fixture
def real_runs(tmp_path):
    runs = tmp_path / "runs"
    for name, seeds in RUNS.items():
        for seed, (start, drop) in seeds.items():
            d = runs / f"{name}-s{seed}"
            (d / "eval").mkdir(parents=True)
            (d / "config.yaml").write_text("{}\n")
            first, last = _kl(seed, start, drop)
            for r, pp, acc in ((0, first, _acc(name, seed)[0]), (3, last, _acc(name, seed)[1])):
                res = {
                    "per_prompt": {f"p{i}": v for i, v in enumerate(acc)},
                    "topk_kl": float(np.mean(pp)),
                    "per_prompt_full_kl": {f"p{i}": v for i, v in enumerate(pp)},
                    "per_prompt_kl": {f"p{i}": v / 2 for i, v in enumerate(pp)},
                    "per_prompt_nll": {f"p{i}": 5.0 + 3.0 * (1.2 - v) for i, v in enumerate(pp)},  # rises
                }
                (d / "eval" / f"round={r}.json").write_text(json.dumps(res))
            (d / "eval" / "round=1.json").write_text(json.dumps({"topk_kl": None}))  # accuracy-only: ignored
            w = WALL[name] * (1 + 0.1 * seed)
            lines = [  # the eval line counts only its 3 s start-up
                {"run": "main", "round": 0, "stage": "eval", "seconds": 10.0, "work_seconds": 7.0},
                {"run": "main", "round": 0, "stage": "train", "seconds": w - 3.0, "work_seconds": w - 9},
                {"run": "replay:x", "round": 0, "stage": "train", "seconds": 999.0},  # not the main run
            ]
            (d / "stage_times.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    teacher = runs / "teacher" / "eval"  # the demo's teacher evaluation: no config.yaml, not a run
    teacher.mkdir(parents=True)
    res = {"topk_kl": None, "per_prompt": {f"p{i}": float(v) for i, v in enumerate(TEACHER_ACC)}}
    (teacher / "round=0.json").write_text(json.dumps(res))
    return runs


def _over_seeds(pairs):
    """(mean, s.e.) of per-seed paired differences: s.e. the larger of the between-seed s.e. and the
    pooled within-seed one."""
    ds, vs = [], []
    for x, y in pairs:
        d = np.asarray(x) - np.asarray(y)
        ds.append(d.mean())
        vs.append(d.var(ddof=1) / len(d))
    between = np.std(ds, ddof=1) / np.sqrt(len(ds)) if len(ds) > 1 else 0.0
    return float(np.mean(ds)), float(max(between, np.sqrt(sum(vs)) / len(ds)))


def _find(rows, start, metric_word):
    return next(v for v in rows if v["claim"].startswith(start) and metric_word in v["claim"])


def test_real_verdicts_restated(real_runs):
    rows = verdicts(real_runs, "real_verdicts.sql")
    # OPD (bucket) lowers the full KL: final - start per seed, seeds as replicates
    d, se = _over_seeds(
        [(_kl(s, *RUNS["low-opd.bucket"][s])[1], _kl(s, *RUNS["low-opd.bucket"][s])[0]) for s in range(3)]
    )
    row = _find(rows, "OPD (bucket) lowers the held-out full KL", "full KL")
    assert row["seeds"] == 3 and row["value"] == pytest.approx(d) and row["se"] == pytest.approx(se)
    start = np.mean([np.mean(_kl(s, 1.0, 0)[0]) for s in range(3)])
    assert row["relative"] == pytest.approx(d / start)
    assert row["holds"] is True  # ~50 % lower, many s.e.
    ref = _find(rows, "OPD (student-topk) lowers the held-out full KL", "full KL")
    assert ref["holds"] is False  # < 10 % lower
    # the teacher NLL rises as the KL falls here: does not hold
    nll = _find(rows, "OPD (bucket) ends with the teacher NLL", "NLL")
    f = lambda x: 5.0 + 3.0 * (1.2 - np.asarray(x))  # noqa: E731
    d, se = _over_seeds(
        [(f(_kl(s, 1.0, 0.6 - (s == 1) * 0.05 + (s == 2) * 0.02)[1]), f(_kl(s, 1.0, 0)[0])) for s in range(3)]
    )
    assert nll["value"] == pytest.approx(d) and nll["value"] > 0 and nll["holds"] is False
    # bucket - student-topk, final full KL
    vs = _find(rows, "OPD (bucket) ends below OPD (student-topk)", "full KL")
    d, se = _over_seeds(
        [
            (_kl(s, *RUNS["low-opd.bucket"][s])[1], _kl(s, *RUNS["low-opd.student-topk"][s])[1])
            for s in range(3)
        ]
    )
    assert vs["value"] == pytest.approx(d) and vs["se"] == pytest.approx(se) and vs["holds"] is True
    # prune (bucket) against OPD (bucket): within 2 s.e., wall the mean of the seeds' ratios (0.5 each)
    prune = next(v for v in rows if v["claim"].startswith("prune (bucket) reaches OPD's final full KL"))
    d, se = _over_seeds(
        [(_kl(s, *RUNS["low-prune.bucket"][s])[1], _kl(s, *RUNS["low-opd.bucket"][s])[1]) for s in range(3)]
    )
    assert prune["value"] == pytest.approx(d) and prune["se"] == pytest.approx(se)
    assert prune["wall_ratio"] == pytest.approx(0.5) and prune["holds"] == bool(d <= 2 * se)
    # one seed: a value, no verdict
    trunc = next(v for v in rows if v["claim"].startswith("truncate (bucket) reaches OPD's final full KL"))
    assert trunc["seeds"] == 1 and trunc["holds"] is None and trunc["needs_seeds"] is True
    assert trunc["wall_ratio"] == pytest.approx(40 / 110)
    assert not any("@start" in v["claim"] for v in rows)


def test_real_accuracy_verdicts_against_the_teacher(real_runs):
    rows = verdicts(real_runs, "real_verdicts.sql")
    seeds = range(3)
    gap = _find(rows, "The teacher answers more", "teacher")
    # two fixed checkpoints (nothing trained): seed 0's round 0 against the teacher, prompt by prompt
    d_gap, se_gap = _over_seeds([(TEACHER_ACC, _acc("low-opd.bucket", 0)[0])])
    assert gap["seeds"] == 1 and gap["value"] == pytest.approx(d_gap) and gap["se"] == pytest.approx(se_gap)
    assert gap["holds"] is bool(d_gap >= 3 * se_gap) and gap["needs_seeds"] is False
    assert sum(v["claim"].startswith("The teacher answers more") for v in rows) == 1  # once per pair
    for name in GAIN:
        label = name.split("-", 1)[1]
        row = _find(rows, f"{label.split('.')[0]} ({label.split('.')[1]}) closes", "gap")
        runs = RUNS[name]
        d, se = _over_seeds([(_acc(name, s)[1], _acc(name, s)[0]) for s in runs])
        d_gap_run, _ = _over_seeds([(TEACHER_ACC, _acc(name, s)[0]) for s in runs])
        assert row["value"] == pytest.approx(d) and row["se"] == pytest.approx(se)
        assert row["relative"] == pytest.approx(d / d_gap_run)
        want = None if len(runs) < 3 else bool(d / d_gap_run >= 0.5 and d >= 3 * se)
        assert row["holds"] is want, name
    assert _find(rows, "opd (bucket) closes", "gap")["holds"] is True  # 70 % of the gap
    assert _find(rows, "opd (student-topk) closes", "gap")["holds"] is False  # 10 %
    # prune (bucket) against OPD (bucket) in final accuracy, at half OPD's wall
    prune = _find(rows, "prune (bucket) reaches OPD's final accuracy", "accuracy")
    d, se = _over_seeds([(_acc("low-prune.bucket", s)[1], _acc("low-opd.bucket", s)[1]) for s in seeds])
    assert prune["value"] == pytest.approx(d) and prune["se"] == pytest.approx(se)
    assert prune["wall_ratio"] == pytest.approx(0.5) and prune["holds"] is bool(d >= -2 * se)
