"""In-flight truncation (arm prune-inflight) with the real vLLM engine and teacher forward: the stops
the rollout made must be the ones the score stage finds afterwards."""

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from opdcache.config import load_config, write_run_config
from opdcache.query import connect
from opdcache.rollout.stage import rollout_round
from opdcache.rundir import RunDir
from opdcache.score.stage import score_run
from opdcache.teacher.stage import teacher_round

pytest.importorskip("vllm")
W_DROP, GAMMA = 0.1, 0.7  # R reaches 0 at the 10th bad event


@pytest.fixture(scope="module")
def near_teacher(models, tmp_path_factory):
    """The student with noise on every weight: top-8 overlap ~0.7, so bad events come at a few-per-ten rate."""
    dst = tmp_path_factory.mktemp("near") / "teacher"
    shutil.copytree(models / "student", dst)
    m = AutoModelForCausalLM.from_pretrained(models / "student")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std().clamp_min(1e-3))
    m.save_pretrained(dst)
    return dst


def _naive_stop(student_ids, teacher_ids, k):
    """tau_0 written out: the first position where 1 - w_drop * (bad events so far) <= 1e-8, else None."""
    c = 0
    for tau, (s, t) in enumerate(zip(student_ids, teacher_ids, strict=True)):
        c += len(set(s) & set(t)) / k < GAMMA
        if 1 - W_DROP * c <= 1e-8:
            return tau
    return None


@pytest.mark.parametrize("tail", [0, 3])
def test_inflight_stops_are_what_scoring_finds(tiny_overrides, near_teacher, tmp_path, tail):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    cfg = load_config(
        None,
        tiny_overrides
        + [
            f"models.teacher={near_teacher}",
            "arm.name=prune-inflight",
            "rollout.chunk_tokens=8",
            f"rollout.unreliable_tail={tail}",
            f"score.w_drop={W_DROP}",
            f"score.gamma={GAMMA}",
        ],
    )
    write_run_config(run, cfg)
    budget = 24 + tail  # some samples stop (tau_0 ~ 21-25 here), some reach the budget
    res = rollout_round(run, 0, cfg, budget, progress=False)
    teacher_round(run, 0, cfg, progress=False)
    score_run(run, cfg.score.variant, cfg.score.spec, progress=False)
    rows = (
        connect(run)
        .execute(
            "SELECT r.finish_reason, r.response_len, s.effective_len, r.student_topk_ids, r.teacher_topk_ids "
            "FROM rollouts r JOIN scores s USING (round, prompt_id, sample)"
        )
        .fetchall()
    )
    k = cfg.rollout.k
    reasons = {row[0] for row in rows}
    assert "unreliable" in reasons and reasons - {"unreliable"}  # both kinds occur at this budget
    for reason, length, e, s_ids, t_ids in rows:
        tau0 = _naive_stop(np.reshape(s_ids, (-1, k)).tolist(), np.reshape(t_ids, (-1, k)).tolist(), k)
        if reason == "unreliable":
            assert tau0 is not None and e == tau0 and length == tau0 + 1 + tail
        else:  # ran to the budget (or EOS) with R > 0 everywhere, or reached 0 only inside the tail
            assert length == budget or reason == "stop"
            assert tau0 is None or length - tau0 <= tail
            assert e == (length if tau0 is None else tau0)
    # what was decoded: the stored positions plus those cut off after a stop, never less, and at most
    # the rest of the stop's chunk per stopped sample
    stopped = sum(r[0] == "unreliable" for r in rows)
    assert res.tokens == sum(r[1] for r in rows)
    assert res.tokens <= res.generated_tokens <= res.tokens + stopped * (cfg.rollout.chunk_tokens - 1)
    times = connect(run).execute("SELECT generated_tokens FROM stage_times").fetchall()
    assert times == []  # rollout_round alone records no stage line; `timed` does (tested in the loop)
