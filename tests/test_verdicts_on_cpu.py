"""analysis/demo/verdicts.sql on a hand-made demo directory: every figure restated by hand."""

import json
import math

import numpy as np
import pytest

from opdcache.demos.runner import verdicts

EVAL = {  # run -> (round-0 per-prompt accuracies, final per-prompt accuracies)
    "low-opd-s0": ([0.0, 0.5, 0.25, 0.25], [0.5, 0.75, 0.5, 1.0]),
    "low-prune-s0": ([0.0, 0.5, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75]),
    "low-random-s0": ([0.0, 0.5, 0.25, 0.25], [0.0, 0.25, 0.0, 0.25]),
    "high-opd-s0": ([0.5, 0.5, 0.75, 0.75], [0.5, 0.5, 0.75, 0.75]),
    "high-prune-s0": ([0.5, 0.5, 0.75, 0.75], [1.0, 1.0, 0.75, 1.0]),
    "high-truncate-s0": ([0.5, 0.5, 0.75, 0.75], [0.5, 0.25, 0.5, 0.5]),
}
WALL = {"low-opd-s0": 100.0, "low-prune-s0": 40.0, "low-random-s0": 45.0, "high-opd-s0": 80.0,
        "high-prune-s0": 84.0, "high-truncate-s0": 60.0}  # fmt: skip
BUDGET = {  # run -> [(round, M_t, mean E)]
    "low-opd-s0": [(0, 768, 500.0), (1, 768, 520.0)],
    "low-prune-s0": [(0, 256, 200.0), (1, 192, 150.0)],
    "low-random-s0": [(0, 256, 200.0), (1, 192, 160.0)],
    "high-opd-s0": [(0, 768, 300.0), (1, 768, 310.0)],
    "high-prune-s0": [(0, 256, 250.0), (1, 320, 300.0), (2, 512, 400.0)],
    "high-truncate-s0": [(0, 256, 250.0), (1, 256, 250.0)],
}
SWEEP = {
    "low-prune-s0": {0.6: 220.0, 0.7: 200.0, 0.8: 180.0},
    "high-prune-s0": {0.6: 300.0, 0.7: 310.0, 0.8: 290.0},
}


def _budget(path, history):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"round": r, "max_tokens": m, "effective_len_mean": e} for r, m, e in history]
    path.write_text(json.dumps({"next_round": len(rows), "history": rows}))


@pytest.fixture
def demo_runs(tmp_path):
    runs = tmp_path / "runs"
    for name, (first, last) in EVAL.items():
        d = runs / name
        (d / "eval").mkdir(parents=True)
        (d / "config.yaml").write_text("{}\n")
        for r, pp in ((0, first), (4, last)):
            res = {"accuracy": float(np.mean(pp)), "per_prompt": {f"p{i}": v for i, v in enumerate(pp)}}
            (d / "eval" / f"round={r}.json").write_text(json.dumps(res))
        w = WALL[name]
        lines = [  # 30 % of the wall in one stage (5 s of it start-up), the rest in another; eval: only
            # its 2 s start-up counts in the wall; work = wall less every start-up = w - 7
            {"run": "main", "round": 0, "stage": "rollout", "seconds": 0.3 * w, "work_seconds": 0.3 * w - 5},
            {
                "run": "main",
                "round": 0,
                "stage": "train",
                "seconds": 0.7 * w - 2.0,
                "work_seconds": 0.7 * w - 2,
            },
            {"run": "main", "round": 0, "stage": "eval", "seconds": 9.0, "work_seconds": 7.0},
            {"run": "replay:x", "round": 0, "stage": "train", "seconds": 1000.0, "work_seconds": 1000.0},
        ]
        (d / "stage_times.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        _budget(d / "budget.json", BUDGET[name])
        for g, e in SWEEP.get(name, {}).items():
            _budget(d / "replays" / f"gamma{g:g}" / "budget.json", [(0, 256, e), (1, 256, e)])
    return runs


def _paired_se(x, y):
    """Same prompts in both evaluations: the s.e. of the per-prompt differences."""
    d = np.subtract(x, y)
    return np.std(d, ddof=1) / math.sqrt(len(d))


def test_verdicts_restated_by_hand(demo_runs):
    got = {(v["claim"].split(":")[0], v["claim"], v["pair"]): v for v in verdicts(demo_runs, "verdicts.sql")}

    def find(prefix, text, pair):
        (v,) = [v for (p, c, q), v in got.items() if p == prefix and text in c and q == pair]
        return v

    # one seed: every figure, and no verdict ("needs >= 3 seeds")
    assert all(v["holds"] is None and v["needs_seeds"] and v["seeds"] == 1 for v in got.values())
    for pair in ("low", "high"):  # OPD's gain: final - round 0, prompt by prompt
        first, last = EVAL[f"{pair}-opd-s0"]
        v = find("OPD teaches", "gain", pair)
        gain, se = np.mean(last) - np.mean(first), _paired_se(last, first)
        assert v["value"] == pytest.approx(gain) and v["se"] == pytest.approx(se)
    v = find("(a) low pair", "wall / OPD wall", "low")
    assert v["value"] == pytest.approx(40.0 / 100.0)  # eval's 2 s start-up counted in both
    v = find("(a) low pair", "start-ups", "low")
    assert v["value"] == pytest.approx((40.0 - 7) / (100.0 - 7))
    v = find("(a) low pair", "accuracy", "low")
    diff = np.mean(EVAL["low-prune-s0"][1]) - np.mean(EVAL["low-opd-s0"][1])
    assert v["value"] == pytest.approx(diff)
    assert v["se"] == pytest.approx(_paired_se(EVAL["low-prune-s0"][1], EVAL["low-opd-s0"][1]))
    assert find("(a) low pair", "E collapses", "low")["value"] == pytest.approx(150.0 / 520.0)
    v = find("(b) high pair", "budget opens", "high")
    assert v["value"] == pytest.approx(512 / 256)
    assert find("(b) high pair", "wall", "high")["value"] == pytest.approx(84.0 / 80.0)
    assert find("(c) gamma sweep", "gamma", "low")["value"] == 1.0
    assert find("(c) gamma sweep", "gamma", "high")["value"] == 0.0  # 300 < 310: not monotone
    v = find("(d) high pair", "truncation", "high")
    diff = np.mean(EVAL["high-prune-s0"][1]) - np.mean(EVAL["high-truncate-s0"][1])
    se = _paired_se(EVAL["high-prune-s0"][1], EVAL["high-truncate-s0"][1])
    assert v["value"] == pytest.approx(diff) and v["se"] == pytest.approx(se)
    v = find("(f) low pair", "random", "low")
    assert v["value"] == pytest.approx(np.mean(EVAL["low-prune-s0"][1]) - np.mean(EVAL["low-random-s0"][1]))
    assert not [c for (p, c, q) in got if p == "(e) low pair"]  # no top-p run here: no verdict made up


def test_two_seeds_pair_prompt_by_prompt(demo_runs):
    """Seed 1 of the high pair: the seeds' differences averaged, s.e. the larger of the between-seed
    one and the pooled within-seed one (variances summed / seeds^2);
    a prompt only one arm answered (p4) is left out of that seed's difference."""
    s1 = {"high-prune-s1": [1.0, 0.75, 0.5, 0.5, 1.0], "high-truncate-s1": [0.75, 0.75, 0.25, 0.0]}
    for name, pp in s1.items():
        d = demo_runs / name
        (d / "eval").mkdir(parents=True)
        (d / "config.yaml").write_text("{}\n")
        for r in (0, 4):
            res = {"accuracy": float(np.mean(pp)), "per_prompt": {f"p{i}": v for i, v in enumerate(pp)}}
            (d / "eval" / f"round={r}.json").write_text(json.dumps(res))
    x0, y0 = EVAL["high-prune-s0"][1], EVAL["high-truncate-s0"][1]
    x1, y1 = s1["high-prune-s1"][:4], s1["high-truncate-s1"]
    d0, d1 = np.mean(np.subtract(x0, y0)), np.mean(np.subtract(x1, y1))  # 0.5, 0.25
    pooled = math.sqrt(_paired_se(x0, y0) ** 2 + _paired_se(x1, y1) ** 2) / 2
    se = max(pooled, abs(d0 - d1) / 2)  # the s.d. of two values over sqrt(2)
    (v,) = [v for v in verdicts(demo_runs, "verdicts.sql") if v["claim"].startswith("(d)")]
    assert v["seeds"] == 2 and v["holds"] is None and v["needs_seeds"]
    assert v["value"] == pytest.approx((d0 + d1) / 2) and v["se"] == pytest.approx(se)


def _copy_run(runs, src, dst, final):
    """Run ``dst``: ``src``'s files with other final per-prompt accuracies."""
    import shutil

    shutil.copytree(runs / src, runs / dst)
    res = {"accuracy": float(np.mean(final)), "per_prompt": {f"p{i}": v for i, v in enumerate(final)}}
    (runs / dst / "eval" / "round=4.json").write_text(json.dumps(res))


@pytest.mark.parametrize("spread", [0.0, 0.5])
def test_three_seeds_are_the_replicates(demo_runs, spread):
    """Seeds 1 2 of the high pair's Prune-OPD and truncation: the value is the mean of the seeds' paired
    differences, the s.e. the larger of their s.d. over seeds / sqrt(3) and the pooled within-seed s.e.;
    with 3 seeds the claim gets its verdict. ``spread`` moves seed 2's truncation run: the seeds disagree
    and the between-seed s.e. takes over."""
    x0, y0 = EVAL["high-prune-s0"][1], EVAL["high-truncate-s0"][1]
    x1, y1 = [1.0, 0.75, 0.75, 1.0], [0.5, 0.5, 0.5, 0.5]
    x2, y2 = [0.75, 1.0, 0.75, 1.0], [min(1.0, v + spread) for v in (0.5, 0.25, 0.75, 0.5)]
    for seed, x, y in ((1, x1, y1), (2, x2, y2)):
        _copy_run(demo_runs, "high-prune-s0", f"high-prune-s{seed}", x)
        _copy_run(demo_runs, "high-truncate-s0", f"high-truncate-s{seed}", y)
    ds = [np.mean(np.subtract(x, y)) for x, y in ((x0, y0), (x1, y1), (x2, y2))]
    pooled = math.sqrt(sum(_paired_se(x, y) ** 2 for x, y in ((x0, y0), (x1, y1), (x2, y2)))) / 3
    between = np.std(ds, ddof=1) / math.sqrt(3)
    se = max(between, pooled)
    (v,) = [v for v in verdicts(demo_runs, "verdicts.sql") if v["claim"].startswith("(d)")]
    assert v["seeds"] == 3 and not v["needs_seeds"]
    assert v["value"] == pytest.approx(np.mean(ds)) and v["se"] == pytest.approx(se)
    assert v["holds"] is bool(np.mean(ds) > 2 * se)
    assert bool(between > pooled) is (spread > 0)
