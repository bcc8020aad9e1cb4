import numpy as np
import pytest

from opdcache.grading import extract_boxed, is_correct
from opdcache.toy.models import build_toy_tokenizer, confusion_matrix
from opdcache.toy.task import MOD, Problem, sample_problems, solution


def test_solutions_are_correct_chains_in_both_formats():
    rng = np.random.default_rng(0)
    for p in sample_problems(50, seed=3):
        for fmt in ("compact", "drift"):
            text = solution(p, fmt, rng)
            assert extract_boxed(text) == str(p.answer)
            # every step's result is the previous one plus `add` (mod 100)
            nums = [int(t) for t in text.replace("=", " = ").split() if t.isdigit()]
            assert len(text.split()) >= 6 * p.steps
            assert p.answer == (p.start + p.steps * p.add) % MOD
            assert nums[-1] == p.answer
    drift = solution(Problem(5, 3, 60), "drift", np.random.default_rng(1))
    assert drift.startswith("1 : 5 + 3 = 8 ;") and "then" in drift


def test_drift_rambles_on_after_a_correct_answer():
    rng = np.random.default_rng(4)
    extras = []
    for p in sample_problems(200, seed=5):
        text = solution(p, "drift", rng, ramble=6.0)
        assert extract_boxed(text) == str(p.answer)
        head, tail = text.split("\\boxed{")
        # the counter survives the switch to the verbose notation: n numbered steps before the box
        lines = [ln for ln in head.replace(";", "|").replace(".", "|").split("|") if ln.strip()]
        assert [int(ln.split()[0]) for ln in lines] == list(range(1, p.steps + 1))
        checks = tail.split("}", 1)[1].split(".")[:-1]
        x = p.answer
        for c in checks:  # each check undoes one step, starting from the answer
            assert c.split() == ["check", str(x), "minus", str(p.add), "gives", str((x - p.add) % MOD)]
            x = (x - p.add) % MOD
        extras.append(len(checks))
    assert 3.5 < np.mean(extras) < 6.5  # geometric: mean `ramble` - 1


def test_drift_with_switch_p_0_keeps_the_compact_notation_up_to_the_answer():
    rng = np.random.default_rng(6)
    p = Problem(17, 7, 12)
    compact = solution(p, "compact")
    for _ in range(20):
        text = solution(p, "drift", rng, switch_p=0.0, ramble=4.0)
        assert text.startswith(compact) and "then" not in text  # the compact answer, word for word
        assert all(line.split()[0] == "check" for line in text[len(compact) :].split(".")[:-1])


def test_toy_tokenizer_is_one_token_per_word_and_round_trips(tmp_path):
    tok = build_toy_tokenizer(tmp_path)
    text = solution(Problem(17, 7, 12), "compact")
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.split())
    assert tok.decode(ids) == text
    from transformers import AutoTokenizer

    # saved and reloaded the way vLLM and the stages load it (the model type decides the class)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids


def test_confusion_rows_are_distributions_without_eos():
    from opdcache.toy.task import VOCAB

    q = confusion_matrix(len(VOCAB) + 2)
    rows = q.sum(1)
    assert np.allclose(rows[2:].numpy(), 1.0, atol=1e-5)
    for ender in (0, 2 + VOCAB.index("\\boxed{"), 2 + VOCAB.index("}")):
        assert float(q[:, ender].sum()) == 0.0  # nothing near-misses into ending the answer
    assert int(q[2 + 50].argmax()) == 2 + 51  # a number's nearest miss is the next number


@pytest.mark.parametrize(
    ("response", "answer", "checker", "ok"),
    [
        ("... ; \\boxed{ 42 }", "42", "exact", True),
        ("\\boxed{ 4 } then \\boxed{ 42 }", "42", "exact", True),
        ("no box 42", "42", "exact", False),
        ("\\boxed{ 420 }", "42", "exact", False),
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", "math", True),
        ("so the answer is \\boxed{\\frac{2}{4}}", "\\frac{1}{2}", "math", True),
        ("\\boxed{3}", "\\frac{1}{2}", "math", False),
    ],
)
def test_answer_checkers(response, answer, checker, ok):
    assert is_correct(response, answer, checker) is ok


def test_logit_scale_scales_every_logit_and_old_records_still_match(tmp_path):
    import dataclasses
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from opdcache.toy.models import ToyModelSpec, built_spec, train_toy_model

    spec = ToyModelSpec("compact", 64, 1, steps=3, batch=2)
    plain = train_toy_model(tmp_path / "plain", spec, progress=False)
    scaled = train_toy_model(tmp_path / "scaled", dataclasses.replace(spec, logit_scale=0.5), progress=False)
    ids = torch.tensor([[5, 17, 40, 3, 90]])
    with torch.no_grad():
        a, b = (AutoModelForCausalLM.from_pretrained(p)(ids).logits for p in (plain, scaled))
    assert a.abs().max() > 0.1
    torch.testing.assert_close(b, 0.5 * a, rtol=1e-5, atol=1e-6)
    # a model built before logit_scale existed: its record lacks the field and means 1.0
    record = json.loads((plain / "toy_model.json").read_text())
    del record["spec"]["logit_scale"]
    (plain / "toy_model.json").write_text(json.dumps(record))
    assert built_spec(plain) == dataclasses.asdict(spec)
    assert built_spec(plain) != dataclasses.asdict(dataclasses.replace(spec, logit_scale=0.7))
