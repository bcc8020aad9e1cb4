"""analysis/demo/real_verdicts.sql on a hand-made real-demo directory: every figure restated by hand."""

import json

import numpy as np
import pytest

from opdcache.real_demo import verdicts

KL = {  # run -> (round-0 per-prompt top-k KL, final per-prompt KL); seed 1 only for opd and prune
    "low-opd-s0": ([1.2, 1.0, 1.4, 1.1], [0.5, 0.45, 0.6, 0.5]),
    "low-prune-s0": ([1.2, 1.0, 1.4, 1.1], [0.55, 0.5, 0.6, 0.52]),
    "low-prune-cal-s0": ([1.2, 1.0, 1.4, 1.1], [0.9, 0.8, 1.0, 0.85]),
    "low-truncate-s0": ([1.2, 1.0, 1.4, 1.1], [0.5, 0.44, 0.62, 0.5]),
    "low-opd-s1": ([1.1, 1.0, 1.3, 1.2], [0.6, 0.5, 0.7, 0.55]),
    "low-prune-s1": ([1.1, 1.0, 1.3, 1.2], [0.62, 0.5, 0.75, 0.6]),
}
WALL = {"low-opd-s0": 100.0, "low-prune-s0": 50.0, "low-prune-cal-s0": 90.0, "low-truncate-s0": 70.0,
        "low-opd-s1": 120.0, "low-prune-s1": 54.0}  # fmt: skip


@pytest.fixture
def real_runs(tmp_path):
    runs = tmp_path / "runs"
    for name, (first, last) in KL.items():
        d = runs / name
        (d / "eval").mkdir(parents=True)
        (d / "config.yaml").write_text("{}\n")
        for r, pp in ((0, first), (3, last)):
            res = {
                "topk_kl": float(np.mean(pp)),
                "per_prompt_kl": {f"p{i}": v for i, v in enumerate(pp)},
                # the full KL: here one that rises where the top-k KL falls
                "per_prompt_full_kl": {f"p{i}": 3.0 - v**2 for i, v in enumerate(pp)},
            }
            (d / "eval" / f"round={r}.json").write_text(json.dumps(res))
        (d / "eval" / "round=1.json").write_text(json.dumps({"topk_kl": None}))  # accuracy-only: ignored
        w = WALL[name]
        lines = [  # the eval line counts only its 3 s start-up
            {"run": "main", "round": 0, "stage": "eval", "seconds": 10.0, "work_seconds": 7.0},
            {"run": "main", "round": 0, "stage": "train", "seconds": w - 3.0, "work_seconds": w - 9},
            {"run": "replay:x", "round": 0, "stage": "train", "seconds": 999.0},  # not the main run
        ]
        (d / "stage_times.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return runs


def _paired(x, y):
    d = np.asarray(x) - np.asarray(y)
    return d.mean(), d.var(ddof=1) / len(d)


def test_real_verdicts_restated(real_runs):
    rows = verdicts(real_runs)
    assert len(rows) == 8  # 4 claims x 2 metrics
    got = {(v["claim"].split(" ")[0], v["pair"]): v for v in rows if "top-k KL" in v["claim"]}
    # OPD's gain: final - round 0 per seed, then over the two seeds
    (d0, v0), (d1, v1) = (_paired(KL[f"low-opd-s{s}"][1], KL[f"low-opd-s{s}"][0]) for s in (0, 1))
    opd = got[("OPD", "low")]
    assert opd["seeds"] == 2
    assert opd["value"] == pytest.approx((d0 + d1) / 2)
    assert opd["se"] == pytest.approx(np.sqrt(v0 + v1) / 2)
    start = np.mean([np.mean(KL[f"low-opd-s{s}"][0]) for s in (0, 1)])
    assert opd["relative"] == pytest.approx(-(d0 + d1) / 2 / start)
    assert opd["holds"] is True  # 55 % lower, many s.e.
    # prune - opd over two seeds; wall ratio the mean of the seeds' ratios
    (p0, w0), (p1, w1) = (_paired(KL[f"low-prune-s{s}"][1], KL[f"low-opd-s{s}"][1]) for s in (0, 1))
    prune = got[("prune", "low")]
    assert prune["value"] == pytest.approx((p0 + p1) / 2)
    assert prune["se"] == pytest.approx(np.sqrt(w0 + w1) / 2)
    assert prune["wall_ratio"] == pytest.approx((50 / 100 + 54 / 120) / 2)
    assert prune["holds"] == bool((p0 + p1) / 2 <= 2 * np.sqrt(w0 + w1) / 2)
    # one seed: the calibrated arm is far above OPD (does not hold); truncation close but 0.7x wall
    cal = got[("prune-cal", "low")]
    c, cv = _paired(KL["low-prune-cal-s0"][1], KL["low-opd-s0"][1])
    assert cal["seeds"] == 1 and cal["value"] == pytest.approx(c) and cal["se"] == pytest.approx(np.sqrt(cv))
    assert cal["holds"] is False
    trunc = got[("truncate", "low")]
    assert trunc["wall_ratio"] == pytest.approx(0.7) and trunc["holds"] is False
    # the full KL's own OPD line, from its own per-prompt values
    sampled = next(v for v in rows if v["claim"].startswith("OPD") and "full KL" in v["claim"])
    f = lambda x: 3.0 - np.asarray(x) ** 2  # noqa: E731
    (s0, u0), (s1, u1) = (_paired(f(KL[f"low-opd-s{s}"][1]), f(KL[f"low-opd-s{s}"][0])) for s in (0, 1))
    assert sampled["value"] == pytest.approx((s0 + s1) / 2) and sampled["value"] > 0
    assert sampled["se"] == pytest.approx(np.sqrt(u0 + u1) / 2) and sampled["holds"] is False
