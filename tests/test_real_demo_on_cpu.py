"""`opdcache demo --real --smoke`: the real pair (SmolLM2-135M-Instruct and itself without layers
20-23) on the embedded arithmetic through the arms with real-demo-specific steps (OPD, Prune-OPD and
its gamma sweep, the calibrated gamma, the GRPO arms; truncation runs in the toy demo's test), with the
distillation metrics, the teacher's accuracy and the calibrated gamma restated from the OPD run's
cache; the run list with every objective; the GSM8K-shaped path's prompt split."""

import json
import shutil

import numpy as np
import pytest

from opdcache.cache.shards import read_cache_shard
from opdcache.cli import REAL_ARMS
from opdcache.config import OBJECTIVES, read_run_config
from opdcache.demos.real import ALL_ARMS, RealSize, demo_jobs, task_prompts
from opdcache.probe import CALIBRATION_QUANTILE, CALIBRATION_TOKENS
from opdcache.rundir import RunDir

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
SMOKE_ARMS = ("opd", "prune", "prune-cal", "prune-grpo", "grpo")  # each run costs ~2 min on 2 cores
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
    from opdcache.demos.real import run_real_demo

    res = run_real_demo(
        None, d / "out", smoke=True, progress=False, models_dir=smollm2["base"], pairs=("low",),
        objective="bucket", arms=SMOKE_ARMS,
    )  # fmt: skip
    yield d / "out", res
    shutil.rmtree(d, ignore_errors=True)  # ~9 GB of checkpoints and optimizer states


def test_every_arm_ran_and_was_evaluated_with_the_teacher(real_demo):
    out, res = real_demo
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.name != "teacher")
    want = [f"low-{a}.bucket-s0" for a in SMOKE_ARMS]
    assert runs == sorted(want)
    assert set(REAL_ARMS) == set(ALL_ARMS)
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
    assert "OPD (bucket) lowers the held-out full KL" in text and "prune-cal (bucket) reaches OPD's" in text
    assert "closes >= 50 % of the teacher-student accuracy gap" in text
    for name in runs:
        assert read_run_config(RunDir(out / "runs" / name)).train.objective == "bucket"
    sweep = RunDir(out / "runs" / "low-prune.bucket-s0")
    swept = {r.root.name for r in sweep.replay_runs() if (r.root / "budget.json").exists()}  # score-only
    assert swept == {f"gamma{g:g}" for g in (0.3, 0.4, 0.5, 0.6, 0.7)}
    assert (out / "report" / "distill_vs_time.png").exists()
    assert (out / "report" / "eval_overlap_by_depth.png").exists()
    assert {r["arm"] for r in res["rows"]} == set(SMOKE_ARMS)


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


def test_arithmetic_task_graded_by_last_number_and_the_teacher_evaluated(real_demo):
    out, res = real_demo
    probe = [json.loads(x) for x in (out / "data" / "probe.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(probe) == 2 and all(p["prompt_id"].startswith("arith-") for p in probe + train)
    assert not {p["question"] for p in probe} & {p["question"] for p in train}
    cfg = read_run_config(RunDir(out / "runs" / "low-opd.bucket-s0"))
    assert cfg.eval.checker == "last-number" and cfg.data.template == "{question}" and cfg.data.chat_template
    assert read_run_config(RunDir(out / "runs" / "low-grpo.bucket-s0")).arm.name == "grpo"
    hybrid = read_run_config(RunDir(out / "runs" / "low-prune-grpo.bucket-s0"))
    assert hybrid.arm.name == "prune-grpo" and hybrid.score.spec.w_drop == 0.05
    teacher = json.loads((out / "runs" / "teacher" / "eval" / "round=0.json").read_text())
    assert teacher["checker"] == "last-number" and teacher["checkpoint"].endswith("smollm2-135m")
    assert set(teacher["per_prompt"]) == {p["prompt_id"] for p in probe}
    rows = {(r["arm"], r["objective"]): r for r in res["rows"]}
    assert all(r["teacher_accuracy"] == teacher["accuracy"] for r in rows.values())
    assert rows[("grpo", "bucket")]["grpo_share"] == [1.0] and rows[("opd", "bucket")]["grpo_share"] is None
    share = rows[("prune-grpo", "bucket")]["grpo_share"]  # positions with R = 0, restated from the cache
    hybrid_run = RunDir(out / "runs" / "low-prune-grpo.bucket-s0")
    from opdcache.query import run_sql

    r_zero = run_sql(
        hybrid_run.root, "SELECT avg((R <= 1e-8)::INTEGER) FROM tokens WHERE round = 0"
    ).fetchall()
    assert share == [pytest.approx(r_zero[0][0])]


def test_gsm8k_shaped_file_splits_into_probe_and_train(tmp_path):
    data = tmp_path / "gsm8k_like.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GSM8K_LIKE))
    size = RealSize(1, 2, 2, 1, 24, 16, 2, 1, 16)
    probe, train = task_prompts(data, tmp_path / "out", size)
    rows = [[json.loads(x) for x in p.read_text().splitlines()] for p in (probe, train)]
    assert [r["question"] for r in rows[0]] == [q for q, _ in GSM8K_LIKE[:2]]
    assert [r["answer"] for r in rows[1]] == ["15", "750", "24"]
    with pytest.raises(Exception, match="the real demo needs 102"):
        task_prompts(data, tmp_path / "out2", RealSize(3, 2, 2, 1, 24, 16, 96, 1, 16))


def test_run_list_puts_opd_first_and_every_objective_beside_it_with_compare():
    jobs = demo_jobs(("low", "mild"), (0, 1), "bucket", True, ALL_ARMS)
    first = [j for j in jobs if j[0] == "low" and j[3] == 0]
    assert first[0] == ("low", "opd", "bucket", 0)
    assert {j[2] for j in first if j[1] == "opd"} == set(OBJECTIVES)
    assert [j[1] for j in first if j[2] == "bucket"] == list(ALL_ARMS)
    assert len(jobs) == 2 * 2 * (len(OBJECTIVES) - 1 + len(ALL_ARMS))
    assert demo_jobs(("low",), (0,), "bucket", False, ("opd", "prune")) == [
        ("low", "opd", "bucket", 0),
        ("low", "prune", "bucket", 0),
    ]
