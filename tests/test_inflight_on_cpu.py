"""In-flight truncation (arm prune-inflight) with the real vLLM engine and teacher forward: the stops
the rollout made must be the ones the score stage finds afterwards."""

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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


def _naive_stop(student_ids, teacher_ids, k, w_drop=W_DROP):
    """tau_0 written out: the first position where 1 - w_drop * (bad events so far) <= 1e-8, else None."""
    c = 0
    for tau, (s, t) in enumerate(zip(student_ids, teacher_ids, strict=True)):
        c += len(set(s) & set(t)) / k < GAMMA
        if 1 - w_drop * c <= 1e-8:
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
    assert teacher_round(run, 0, cfg, progress=False).parts == 0  # the rollout wrote complete cache parts
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
    # what was decoded: the stored positions plus those streamed past a stop before its abort took
    # effect (the engine runs ahead of the teacher), never less, never past the budget; the teacher
    # scored each stored position once and no other
    assert res.tokens == sum(r[1] for r in rows) == res.teacher_positions
    assert (
        res.tokens
        <= res.generated_tokens
        <= res.tokens + sum(budget - r[1] for r in rows if r[0] == "unreliable")
    )
    times = connect(run).execute("SELECT generated_tokens FROM stage_times").fetchall()
    assert times == []  # rollout_round alone records no stage line; `timed` does (tested in the loop)


def _full_logprobs(model, prompt, response, vocab):
    """The teacher's log-softmax at every response position, written out: one plain forward of the
    whole sequence, logits[P-1 .. P+T-2]."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1, :vocab]
    return torch.log_softmax(logits.float(), -1).numpy()


@pytest.mark.parametrize("chunks", [[5, 1, 7, 3], [1] * 6, [16]])
def test_growing_response_scores_each_position_once_and_equals_the_whole_forward(near_teacher, chunks):
    from opdcache.teacher.forward import GrowingResponse

    model = AutoModelForCausalLM.from_pretrained(near_teacher).eval()
    vocab, k = model.config.vocab_size, 8
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, vocab, 9)
    response = rng.integers(3, vocab, sum(chunks))
    student_ids = rng.integers(0, vocab, (len(response), k))
    lp = _full_logprobs(model, prompt, response, vocab)
    root = GrowingResponse(model, prompt, k, vocab, chunk=4)
    for g in (root.fork(), root):  # a fork (a prompt's other sample) scores the same as its origin
        got, start = [], 0
        for n in chunks:
            got.append(g.extend(response[start : start + n], student_ids[start : start + n]))
            start += n
        assert g.positions == len(response)
        values = np.concatenate([o.topk_logprobs for o in got])
        ids = np.concatenate([o.topk_ids for o in got])
        np.testing.assert_allclose(values, -np.sort(-lp, axis=1)[:, :k], atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(lp, ids, 1), values, atol=1e-5)
        np.testing.assert_allclose(
            np.concatenate([o.sampled_logprob for o in got]),
            lp[np.arange(len(response)), response],
            atol=1e-5,
        )
        np.testing.assert_allclose(
            np.concatenate([o.on_student_topk for o in got]),
            np.take_along_axis(lp, student_ids, 1),
            atol=1e-5,
        )


@pytest.fixture(scope="module")
def student_engine(models):
    from opdcache.rollout import engine

    llm = engine.make_llm(str(models / "student"), 8, 128, 0, kv_cache_gib=1)
    yield llm
    engine.shutdown(llm)


def test_inflight_rows_equal_a_stop_applied_afterwards(models, near_teacher, student_engine):
    """For the same random draws (the same per-request seed in both calls) the
    rows are a plain generation's cut after the fact at the naive stop point, teacher columns included,
    and no position past the stop went through the teacher."""
    from opdcache.rollout import engine, inflight
    from opdcache.teacher.forward import GrowingResponse
    from opdcache.variant import VariantSpec

    model = AutoModelForCausalLM.from_pretrained(near_teacher).eval()
    vocab, k, budget, tail = model.config.vocab_size, 8, 24, 2
    w_drop = 0.08  # R = 0 at the 13th bad event: ~12-14 of the first 24 positions here are bad
    spec = VariantSpec(gamma=GAMMA, w_drop=w_drop)
    tokenizer = AutoTokenizer.from_pretrained(models / "student")
    reasons = []
    for i in range(8):
        prompt = tokenizer(f"Question: {i} + {i + 1} = ?\nAnswer:")["input_ids"]
        c = engine.generate(student_engine, [prompt], 1, 1.0, budget, k, seeds=[i])[0].outputs[0]
        grown, decoded = inflight.generate_inflight(
            student_engine,
            [prompt],
            1,
            budget,
            k,
            8,
            tail,
            spec,
            lambda p: GrowingResponse(model, p, k, vocab),
            seeds=[i],
        )
        s = grown[0][0]
        full = engine.completion_arrays(c, k)
        lp = _full_logprobs(model, prompt, full["response_ids"], vocab)
        t_ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        tau0 = _naive_stop(full["student_topk_ids"].tolist(), t_ids.tolist(), k, w_drop)
        keep = len(lp) if tau0 is None else min(len(lp), tau0 + 1 + tail)
        arrays, reason = s.result()
        reasons.append(reason)
        assert reason == ("unreliable" if tau0 is not None and keep == tau0 + 1 + tail else c.finish_reason)
        np.testing.assert_array_equal(arrays["response_ids"], full["response_ids"][:keep])
        np.testing.assert_array_equal(arrays["student_topk_ids"], full["student_topk_ids"][:keep])
        np.testing.assert_allclose(arrays["student_logprob"], full["student_logprob"][:keep], atol=1e-5)
        close = {"rtol": 1e-5, "atol": 1e-5}
        np.testing.assert_allclose(
            arrays["teacher_logprob"], lp[np.arange(keep), full["response_ids"][:keep]], **close
        )
        np.testing.assert_allclose(
            arrays["teacher_topk_logprobs"], np.take_along_axis(lp, t_ids, 1)[:keep], **close
        )
        np.testing.assert_allclose(
            arrays["teacher_logprob_on_student_topk"],
            np.take_along_axis(lp, full["student_topk_ids"], 1)[:keep],
            **close,
        )
        assert s.teacher.positions == keep  # nothing past the stop went through the teacher
        assert keep <= decoded <= len(lp)
    assert "unreliable" in reasons and set(reasons) - {"unreliable"}
