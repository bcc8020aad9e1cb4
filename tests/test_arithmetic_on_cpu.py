"""The embedded arithmetic task: gold answers recomputed from the question text, wordings held out."""

import re

import pytest

from opdcache.arithmetic import (
    HELD_OUT,
    KINDS,
    WORDINGS,
    is_held_out,
    parse_id,
    prompt_ids,
    sample_arithmetic,
    write_arithmetic,
)
from opdcache.prompts import read_prompt_set


def naive_answer(question: str) -> int:
    """The answer read off the question's words, independently of the generator's tables."""
    a, b = (int(x) for x in re.findall(r"\d+", question))
    q = question.lower()
    if any(w in q for w in ("×", "times", "*", " x ", "multipl", "product", "each", "packs")):
        return a * b
    if any(w in q for w in ("gave", "sold")):
        return a - b
    return a + b


def test_answers_match_the_questions_and_ranges():
    problems = sample_arithmetic(600, seed=3, wordings="all")
    for p in problems:
        assert p.answer == naive_answer(p.question), p
        assert 0 < p.answer <= (81 if p.kind != "sum" else 198)
    assert {p.kind for p in problems} == set(KINDS)
    assert [p.kind for p in problems[:6]] == list(KINDS) * 2  # kinds in turn


def test_seeded_and_wordings_split():
    assert sample_arithmetic(50, seed=1) == sample_arithmetic(50, seed=1)
    assert sample_arithmetic(50, seed=1) != sample_arithmetic(50, seed=2)
    train = sample_arithmetic(600, seed=0, wordings="train")
    held = sample_arithmetic(300, seed=0, wordings="held-out")
    every = sample_arithmetic(1200, seed=0, wordings="all")
    for p in train:
        assert p.wording < WORDINGS[p.kind] - HELD_OUT
    for p in held:
        assert p.wording >= WORDINGS[p.kind] - HELD_OUT
    assert {(p.kind, p.wording) for p in every} == {(k, w) for k in KINDS for w in range(WORDINGS[k])}
    texts = {p.question for p in every}  # numbers, names and wordings vary
    assert len(texts) > 600


def test_exclude_keeps_probe_questions_out_of_training():
    probe = sample_arithmetic(90, seed=1, wordings="all")
    train = sample_arithmetic(400, seed=2, exclude=[p.question for p in probe])
    assert not {p.question for p in probe} & {p.question for p in train}
    with pytest.raises(ValueError, match="kinds"):
        sample_arithmetic(3, seed=0, kinds=["division"])


def test_written_file_loads_and_ids_tell_held_out_wordings(tmp_path):
    problems = sample_arithmetic(30, seed=5, wordings="all")
    path = write_arithmetic(tmp_path / "sub" / "probe.jsonl", problems)
    ps = read_prompt_set(path)
    assert [p.question for p in ps.prompts] == [p.question for p in problems]
    assert [p.answer for p in ps.prompts] == [str(p.answer) for p in problems]
    assert len({p.prompt_id for p in ps.prompts}) == 30
    for pid, p in zip(prompt_ids(problems), problems, strict=True):
        assert parse_id(pid) == (p.kind, p.wording)
        assert is_held_out(pid) == (p.wording >= WORDINGS[p.kind] - HELD_OUT)
    assert parse_id("gsm8k-12") is None and not is_held_out("gsm8k-12")
    assert not list(tmp_path.rglob(".*.tmp"))
