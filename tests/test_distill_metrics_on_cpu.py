"""The evaluation's distillation metrics (evaluation.distill_fields) against a naive restatement:
full-vocabulary transformers forwards of the tiny student and teacher, top-k by sorting, per-prompt
and per-band pooling written out with Python loops."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdcache.evaluation import EvalTeacher, distill_fields
from opdcache.teacher.stage import checked_vocab

K, BAND = 4, 3


def _full_logprobs(model, ids, vocab):
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0].double()[:, :vocab]
    return torch.log_softmax(logits, -1).numpy()


def _completion(lp_student, prompt, response):
    """A vLLM-like completion (lists of per-position dicts; rank 1 = most likely) from full log-probs."""
    p = len(prompt)
    entries = []
    for t, tok in enumerate(response):
        row = lp_student[p - 1 + t]
        order = np.argsort(-row, kind="stable")[:K]
        d = {int(j): SimpleNamespace(rank=r + 1, logprob=float(row[j])) for r, j in enumerate(order)}
        d.setdefault(int(tok), SimpleNamespace(rank=None, logprob=float(row[tok])))
        entries.append(d)
    return SimpleNamespace(token_ids=list(response), logprobs=entries)


def test_distill_fields_match_a_naive_restatement(models):
    student = AutoModelForCausalLM.from_pretrained(models / "student", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(models / "teacher", dtype=torch.float32).eval()
    vocab = checked_vocab(str(models / "teacher"), str(models / "student"))
    assert vocab == len(AutoTokenizer.from_pretrained(models / "student")) < 128  # the teacher is padded
    rng = np.random.default_rng(0)
    prompts = [SimpleNamespace(prompt_id=f"q{i}") for i in range(3)]
    encoded = [list(rng.integers(3, vocab, size=4)) for _ in prompts]
    lengths = [[7, 2], [5, 0], [0]]  # an empty sample, and a prompt with no tokens at all
    outs, want = [], {"kl": {}, "nll": {}, "own": {}, "ov": {}, "full": {}, "ent": {}, "t_ent": {}}
    bands: dict[str, dict[int, list[float]]] = {"kl": {}, "ov": {}}
    for pr, ids, lens in zip(prompts, encoded, lengths, strict=True):
        comps, per = [], {key: [] for key in want}
        for n in lens:
            resp = list(rng.integers(3, vocab, size=n))
            ls = _full_logprobs(student, ids + resp, vocab)
            lt = _full_logprobs(teacher, ids + resp, vocab)
            comps.append(_completion(ls, ids, resp))
            for t, y in enumerate(resp):
                s_row, t_row = ls[len(ids) - 1 + t], lt[len(ids) - 1 + t]
                top_s = sorted(range(vocab), key=lambda j: -s_row[j])[:K]
                top_t = sorted(range(vocab), key=lambda j: -t_row[j])[:K]
                z = sum(np.exp(s_row[j]) for j in top_s)
                kl = sum(np.exp(s_row[j]) / z * (s_row[j] - t_row[j]) for j in top_s)
                ov = len(set(top_s) & set(top_t)) / K
                per["kl"].append(kl), per["nll"].append(-t_row[y]), per["own"].append(-s_row[y])
                per["ov"].append(ov)
                per["full"].append(sum(np.exp(s_row[v]) * (s_row[v] - t_row[v]) for v in range(vocab)))
                per["ent"].append(-sum(np.exp(s_row[v]) * s_row[v] for v in range(vocab)))
                per["t_ent"].append(-sum(np.exp(t_row[v]) * t_row[v] for v in range(vocab)))
                bands["kl"].setdefault(t // BAND * BAND, []).append(kl)
                bands["ov"].setdefault(t // BAND * BAND, []).append(ov)
        outs.append(SimpleNamespace(outputs=comps))
        for key, vals in per.items():
            if vals:
                want[key][pr.prompt_id] = np.mean(vals)
    got = distill_fields(
        EvalTeacher(teacher, "t", vocab, K, BAND, chunk=2, student=student), prompts, encoded, outs, False
    )
    assert set(got["per_prompt_kl"]) == {"q0", "q1"}  # q2 generated nothing
    for p in ("q0", "q1"):
        assert got["per_prompt_kl"][p] == pytest.approx(want["kl"][p], abs=1e-5)
        assert got["per_prompt_nll"][p] == pytest.approx(want["nll"][p], abs=1e-4)
        assert got["per_prompt_sample_kl"][p] == pytest.approx(want["nll"][p] - want["own"][p], abs=1e-4)
        assert got["per_prompt_full_kl"][p] == pytest.approx(want["full"][p], abs=1e-5)
    assert got["topk_kl"] == pytest.approx(np.mean(list(want["kl"].values())), abs=1e-5)
    assert got["teacher_nll"] == pytest.approx(np.mean(list(want["nll"].values())), abs=1e-4)
    assert got["student_nll"] == pytest.approx(np.mean(list(want["own"].values())), abs=1e-4)
    assert got["overlap"] == pytest.approx(np.mean(list(want["ov"].values())))
    assert got["full_kl"] == pytest.approx(np.mean(list(want["full"].values())), abs=1e-5)
    assert got["student_entropy"] == pytest.approx(np.mean(list(want["ent"].values())), abs=1e-5)
    assert got["teacher_entropy"] == pytest.approx(np.mean(list(want["t_ent"].values())), abs=1e-5)
    assert got["band"] == BAND and list(got["overlap_by_band"]) == ["0", "3", "6"]
    for b, vals in bands["ov"].items():
        assert got["overlap_by_band"][str(b)] == pytest.approx(np.mean(vals))
        assert got["kl_by_band"][str(b)] == pytest.approx(np.mean(bands["kl"][b]), abs=1e-5)
