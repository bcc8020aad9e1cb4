"""The GPU path (skipped without CUDA): the teacher forward in bf16, one training round in bf16 under
DeepSpeed/NCCL with the first-step ratio at 1, and the GPU memory each stage leaves behind."""

import json

import numpy as np
import pytest
import torch

from opdcache.cache.synthetic import write_synthetic_run
from opdcache.config import load_config, write_run_config
from opdcache.rundir import RunDir
from opdcache.score.stage import score_run
from opdcache.variant import VariantSpec

pytestmark = pytest.mark.gpu


def _report(name, **figures):
    print(f"GPU-FIGURE {name} " + json.dumps(figures))


@pytest.fixture(scope="module")
def big(tmp_path_factory, tiny_overrides):
    """Tiny-vocabulary models large enough (~50 M parameters) that memory left behind is visible."""
    from opdcache.models.tiny import build_tiny_model

    d = tmp_path_factory.mktemp("big")
    student = build_tiny_model(d / "student", seed=1, hidden=1024, layers=4)
    teacher = build_tiny_model(d / "teacher", seed=2, hidden=1024, layers=4)
    return [*tiny_overrides, f"models.student={student}", f"models.teacher={teacher}"]


def test_teacher_forward_in_bf16_against_fp32(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdcache.teacher.forward import score_response
    from opdcache.teacher.stage import load_teacher

    n_tok = len(AutoTokenizer.from_pretrained(models / "teacher"))
    rng = np.random.default_rng(0)
    prompt, response = rng.integers(3, 60, 24), rng.integers(3, 60, 200)
    student_topk = np.stack([rng.choice(60, 8, replace=False) for _ in range(200)])
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = load_teacher(str(models / "teacher"), dtype, "cuda", "")
        assert next(model.parameters()).is_cuda
        out[dtype] = score_response(model, prompt, response, student_topk, 8, vocab=n_tok, chunk=64)
        del model
    torch.cuda.empty_cache()
    same = np.mean(
        [set(a) == set(b) for a, b in zip(out["float32"].topk_ids, out["bfloat16"].topk_ids, strict=True)]
    )
    diff = np.abs(out["float32"].sampled_logprob - out["bfloat16"].sampled_logprob)
    _report("teacher_bf16_vs_fp32", topk_sets_equal=float(same), max_abs_logprob_diff=float(diff.max()))
    assert np.isfinite(out["bfloat16"].topk_logprobs).all()
    ref = AutoModelForCausalLM.from_pretrained(models / "teacher", dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(
            ref(torch.tensor(np.concatenate([prompt, response]))[None]).logits[0, 23:-1, :n_tok], -1
        )
    np.testing.assert_allclose(
        out["float32"].sampled_logprob, lp[np.arange(200), response].numpy(), atol=1e-3
    )


def test_training_round_in_bf16_first_step_ratio_one(tmp_path, big):
    from opdcache.train.stage import train_round

    run = write_synthetic_run(
        tmp_path / "run",
        rounds=1,
        parts_per_round=2,
        prompts_per_part=8,
        mean_len=200,
        max_tokens=256,
        k=8,
        vocab=80,
    )
    write_run_config(run, load_config(None, [*big, "train.bf16=true", "train.lr=1e-4"]))
    score_run(run, "prune", VariantSpec(), progress=False)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    res = train_round(RunDir(run.root), 0, load_config(run.config), "prune", progress=False)
    peak = torch.cuda.max_memory_allocated()
    left = torch.cuda.memory_reserved()
    _report(
        "train_bf16",
        steps=res.steps,
        clip_frac_first=res.clip_frac_first,
        tokens_per_s=res.tokens / res.seconds,
        peak_gib=peak / 2**30,
        reserved_after_gib=left / 2**30,
        reserved_before_gib=before / 2**30,
        old_max_abs_diff=res.old_logprob_max_abs_diff,
    )
    assert res.steps == 1 and res.clip_frac_first == 0.0 and np.isfinite(res.loss_first)
    assert (run.checkpoint(1) / "model.safetensors").exists()
    assert peak > 256 * 2**20  # the model, its gradients and the optimizer state were on the GPU
    # what stays is the NCCL communicator (32 MiB on an H200), not the model or the optimizer state
    assert left - before < 0.1 * peak, "the training stage must give the GPU back (vLLM needs it next round)"


def test_teacher_stage_gives_the_gpu_back(tmp_path, big, rollout_parts_from):
    from opdcache.teacher.stage import teacher_round

    src = write_synthetic_run(
        tmp_path / "src",
        rounds=1,
        parts_per_round=2,
        prompts_per_part=4,
        mean_len=100,
        max_tokens=128,
        k=8,
        vocab=80,
    )
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    cfg = load_config(None, big)
    write_run_config(run, cfg)
    rollout_parts_from(src.shards(src.cache_round(0)), run.rollout_round(0))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    res = teacher_round(run, 0, cfg, progress=False)
    _report(
        "teacher_stage",
        positions_per_s=res.tokens / res.seconds,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        reserved_after_gib=torch.cuda.memory_reserved() / 2**30,
        reserved_before_gib=before / 2**30,
    )
    assert res.parts == 2 and torch.cuda.max_memory_allocated() > 128 * 2**20
    assert torch.cuda.memory_reserved() - before < 0.1 * torch.cuda.max_memory_allocated()


def test_engine_sleeps_between_stages_and_wakes_with_new_weights(models, tmp_path):
    """PersistentEngine.release on a GPU: vLLM sleep level 2 hands the memory back; the next get wakes
    it with another checkpoint's weights, which must give a fresh engine's log-probs."""
    pytest.importorskip("vllm")
    import shutil

    from transformers import AutoModelForCausalLM

    from opdcache.rollout.engine import PersistentEngine, completion_arrays, generate

    trained = tmp_path / "trained"
    shutil.copytree(models / "student", trained)
    m = AutoModelForCausalLM.from_pretrained(models / "student")
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.05)
    m.save_pretrained(trained)
    prompt = [[1, 2, 3, 4]]

    def logprobs(llm):
        (out,) = generate(llm, prompt, 1, 1.0, 16, 8)
        return completion_arrays(out.outputs[0], 8)

    kw = {"dtype": "float32", "gpu_memory_utilization": 0.3, "enforce_eager": True}
    with PersistentEngine(**kw) as eng:
        eng.get(str(models / "student"), 8, 64, 0)
        free_awake = torch.cuda.mem_get_info()[0]
        eng.release()
        assert eng.asleep and torch.cuda.mem_get_info()[0] > free_awake + 0.2 * torch.cuda.mem_get_info()[1]
        llm, _ = eng.get(str(trained), 8, 64, 0)
        assert not eng.asleep and eng.starts == 1
        woken = logprobs(llm)
    with PersistentEngine(**kw) as fresh:
        llm, _ = fresh.get(str(trained), 8, 64, 0)
        ref = logprobs(llm)
    # same seed, same weights: the same tokens, and log-probs equal to fp32 noise
    assert np.array_equal(woken["response_ids"], ref["response_ids"])
    assert np.abs(woken["student_topk_logprobs"] - ref["student_topk_logprobs"]).max() < 1e-4
