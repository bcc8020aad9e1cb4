"""A real checkpoint end to end: SmolLM2-135M-Instruct (49,152-token vocabulary, chat template) as
teacher, its first 4 layers as student, GSM8K-shaped prompts: init -> rollout -> teacher -> score ->
train -> verify through the CLI, and the cache checked against a transformers fp32 forward."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdcache.cache.shards import read_cache_shard
from opdcache.cli import main
from opdcache.rundir import RunDir

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
K = 16
FP16_REL = 2.0**-11  # cache precision (docs/cache-format.md)
GSM8K_LIKE = [  # the raw GSM8K shape: question + worked answer ending in "#### N"; no prompt_id
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
    ("A book costs $12. How much do 3 books cost?", "3 * 12 = <<3*12=36>>36\n#### 36"),
    ("Sara ran 5 km on Monday and twice as far on Tuesday. How far did she run in total?", "#### 15"),
    ("There are 1,200 seats and 450 are taken. How many are free?", "1200 - 450 = 750\n#### 750"),
]


@pytest.fixture(scope="module")
def real_run(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    prompts = d / "gsm8k_like.jsonl"
    prompts.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GSM8K_LIKE))
    run = RunDir(d / "run")
    sets = [
        f"models.student={smollm2['student']}",
        f"models.teacher={smollm2['teacher']}",
        f"data.prompts={prompts}",
        "data.chat_template=true",
        "rollout.n_samples=2",
        "rollout.prompts_per_round=4",
        "rollout.part_size=2",
        "rollout.kv_cache_gib=1",
        "budget.initial=32",
        "budget.min=16",
        "budget.max=48",
        "budget.step=16",
        "budget.margin=8",
        "train.micro_batch_size=4",
        "train.lr=1e-5",
    ]
    assert main(["init", str(run.root), *[x for s in sets for x in ("--set", s)]]) == 0
    for cmd in (
        ["rollout", "--round", "0"],
        ["teacher", "--round", "0"],
        ["score"],
        ["train", "--round", "0"],
    ):
        assert main([cmd[0], str(run.root), *cmd[1:], "--quiet"]) == 0, cmd
    yield run, smollm2
    shutil.rmtree(d, ignore_errors=True)  # a checkpoint and its optimizer state (~1.3 GB)


def _logprobs(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(ids)[None]).logits[0].float(), -1).numpy()


def test_cache_matches_a_transformers_forward(real_run):
    run, models = real_run
    tok = AutoTokenizer.from_pretrained(models["student"])
    rows = [r for p in run.shards(run.cache_round(0)) for r in read_cache_shard(p)[0].to_pylist()]
    assert len(rows) == 8 and all(0 < len(r["response_ids"]) <= 32 for r in rows)
    for row in rows:
        prompt = tok.decode(row["prompt_ids"])
        assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
        p, t = len(row["prompt_ids"]), len(row["response_ids"])
        ids = row["prompt_ids"] + row["response_ids"]
        for role in ("student", "teacher"):
            lp = _logprobs(models[role], ids)[p - 1 : p - 1 + t]
            assert lp.shape[1] == 49152
            top = np.array(row[f"{role}_topk_ids"]).reshape(t, K)
            ref_top = -np.sort(-lp, axis=1)[:, :K]
            # the cached ids are the fp32 top-16 (ties at the boundary aside: compare the values there)
            np.testing.assert_allclose(np.take_along_axis(lp, top, 1), ref_top, atol=1e-4)
            cached = np.array(row[f"{role}_topk_logprobs"]).reshape(t, K)
            assert (np.abs(cached - ref_top) <= 1e-4 + np.abs(ref_top) * FP16_REL).all(), role
            sampled = lp[np.arange(t), row["response_ids"]]
            assert (
                np.abs(np.array(row[f"{role}_logprob"]) - sampled) <= 1e-4 + np.abs(sampled) * FP16_REL
            ).all()


def test_the_run_verifies_and_trained(real_run, capsys):
    run, _ = real_run
    assert main(["verify", str(run.root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "parts OK" in out and "notes" not in out  # no leftover records of rollout parts
    assert (run.checkpoint(1) / "model.safetensors").exists()
    stages = [json.loads(line)["stage"] for line in run.stage_times.read_text().splitlines()]
    assert stages == ["rollout", "teacher", "score:prune", "train"]  # stages run one by one are timed too


def test_the_hybrid_objective_runs_on_the_real_model(real_run):
    """Issue 24 on SmolLM2 with its chat template: replay the cached round with prune-grpo (math-verify
    on GSM8K's '#### N' answers, which the rollout stored in the cache), no new code path."""
    from opdcache.query import run_sql

    run, _ = real_run
    assert main(["replay", str(run.root), "--variant", "hyb", "--arm", "prune-grpo", "--quiet"]) == 0
    sub = run.replay("hyb")
    assert (sub.checkpoint(1) / "model.safetensors").exists()
    metrics = json.loads((sub.checkpoint(1) / "opdcache_train.json").read_text())["metrics"]
    assert all(np.isfinite(m["loss"]) for m in metrics) and "grpo_tokens" in metrics[0]
    graded = run_sql(sub.root, "select count(outcome), count(*) from scores").fetchall()[0]
    assert graded[0] == graded[1] == 8
