"""`opdcache demo --real --smoke`: the real pair (SmolLM2-135M-Instruct and itself without layers
20-23) through every arm and, for OPD, every objective, with the distillation metrics and the
calibrated gamma restated from the OPD run's cache."""

import json
from pathlib import Path

import numpy as np
import pytest

from opdcache.cache.shards import read_cache_shard
from opdcache.cli import main
from opdcache.config import read_run_config
from opdcache.real_demo import ALL_ARMS, CALIBRATION_QUANTILE, CALIBRATION_TOKENS
from opdcache.rundir import RunDir
from opdcache.train import OBJECTIVES

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
GSM8K_LIKE = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7"),
    ("A book costs $12. How much do 3 books cost?", "3 * 12 = 36\n#### 36"),
    ("Sara ran 5 km on Monday and twice as far on Tuesday. How far did she run in total?", "#### 15"),
    ("There are 1,200 seats and 450 are taken. How many are free?", "1200 - 450 = 750\n#### 750"),
    ("A box holds 6 eggs. How many eggs are in 4 boxes?", "6 * 4 = 24\n#### 24"),
]


@pytest.fixture(scope="module")
def real_demo(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("real-demo")
    data = SHARED
    if not SHARED.exists():  # the real GSM8K test set where the shared data is present, else its shape
        data = d / "gsm8k_like.jsonl"
        data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GSM8K_LIKE))
    from opdcache.real_demo import run_real_demo

    res = run_real_demo(
        data, d / "out", smoke=True, progress=False, models_dir=smollm2["base"], pairs=("low",),
        objective="bucket", compare=True, arms=ALL_ARMS,
    )  # fmt: skip
    return d / "out", res


def test_every_arm_ran_and_was_evaluated_with_the_teacher(real_demo):
    out, res = real_demo
    runs = sorted(p.name for p in (out / "runs").iterdir())
    want = [f"low-opd.{o}-s0" for o in OBJECTIVES] + [f"low-{a}.bucket-s0" for a in ALL_ARMS if a != "opd"]
    assert runs == sorted(want)
    for name in runs:
        run = RunDir(out / "runs" / name)
        assert (run.checkpoint(1) / "model.safetensors").exists()
        ev = [json.loads(run.eval_result(r).read_text()) for r in (0, 1)]
        for e in ev:
            assert e["teacher"].endswith("smollm2-135m") and e["k"] == 16 and e["topk_kl"] > 0
            assert len(e["per_prompt_kl"]) == 2  # the 2 held-out probe prompts
            assert e["sample_kl"] == pytest.approx(e["teacher_nll"] - e["student_nll"])
    first = {json.loads(RunDir(out / "runs" / n).eval_result(0).read_text())["topk_kl"] for n in runs}
    assert len(first) == 1  # round 0 is evaluated once and shared
    text = (out / "summary.md").read_text()
    assert (
        "OPD (sum-and-sample) lowers the held-out full KL" in text
        and "prune-cal (bucket) reaches OPD's" in text
    )
    for o in OBJECTIVES:  # each run trained with its objective
        name = "low-opd." + o + "-s0"
        assert read_run_config(RunDir(out / "runs" / name)).train.objective == o
    assert (out / "report" / "distill_vs_time.png").exists()
    assert (out / "report" / "eval_overlap_by_depth.png").exists()
    assert {r["arm"] for r in res["rows"]} == set(ALL_ARMS)


def test_calibrated_gamma_is_the_quantile_of_early_overlap(real_demo):
    out, _ = real_demo
    opd = RunDir(out / "runs" / "low-opd.bucket-s0")
    overlaps = []
    for part in opd.shards(opd.cache_round(0)):
        table, meta = read_cache_shard(part)
        for row in table.to_pylist():
            t = len(row["response_ids"])
            s = np.array(row["student_topk_ids"]).reshape(t, meta.k)
            q = np.array(row["teacher_topk_ids"]).reshape(t, meta.k)
            overlaps += [len(set(s[i]) & set(q[i])) / meta.k for i in range(min(t, CALIBRATION_TOKENS))]
    want = float(np.quantile(overlaps, CALIBRATION_QUANTILE))
    cfg = read_run_config(RunDir(out / "runs" / "low-prune-cal.bucket-s0"))
    assert cfg.score.variant == "cal" and cfg.score.spec.gamma == pytest.approx(want, abs=1e-5)
    assert read_run_config(RunDir(out / "runs" / "low-prune.bucket-s0")).score.spec.gamma == 0.7


def test_real_demo_needs_data(capsys):
    assert main(["demo", "--real", "--smoke"]) == 2
    assert "demo --real needs --data" in capsys.readouterr().err
