"""The stepping-chain task (chain.py): questions, gold values, the graded horizon, held-out wordings."""

import re

import pytest

from opdcache.chain import (
    HELD_OUT,
    STEPS,
    WORDINGS,
    horizon,
    is_held_out,
    sample_chains,
    worked_answer,
    write_chains,
)
from opdcache.errors import OpdcacheError
from opdcache.grading import grader, is_correct
from opdcache.prompts import load_prompts


def test_gold_values_and_worked_answer_by_hand():
    for c in sample_chains(16, 0, "all"):
        nums = {int(x) for x in re.findall(r"\d+", c.question)}
        assert nums == {c.start, c.step, STEPS}, c.question
    start, step = c.start, c.step
    assert c.answer.split() == [str(start + step * i) for i in range(1, STEPS + 1)]
    lines = worked_answer(c).splitlines()
    assert len(lines) == STEPS
    assert lines[0] == f"{start} + {step} = {start + step}"
    assert lines[-1] == f"{start + step * (STEPS - 1)} + {step} = {start + step * STEPS}"


def test_horizon_hand_worked():
    gold = "43 49 55"
    # all right
    assert horizon("37 + 6 = 43\n43 + 6 = 49\n49 + 6 = 55", gold) == (1.0, 1.0)
    # one slip at step 2 that carries on: steps 1 right, 2 and 3 wrong
    assert horizon("37 + 6 = 43\n43 + 6 = 50\n50 + 6 = 56", gold) == (
        pytest.approx(1 / 3),
        pytest.approx(1 / 3),
    )
    # a wrong middle value, the last line right again: 2 of 3 steps, prefix 1
    assert horizon("37 + 6 = 43\n43 + 6 = 50\n49 + 6 = 55", gold) == (
        pytest.approx(2 / 3),
        pytest.approx(1 / 3),
    )
    # lines without digits are skipped, extra lines ignored, missing ones wrong
    assert horizon("Sure!\n37 + 6 = 43\n\nok\n43 + 6 = 49", gold) == (
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
    )
    assert horizon("", gold) == (0.0, 0.0)
    assert horizon("43\n49\n55\n61\n67", gold) == (1.0, 1.0)


def test_chain_checker_is_the_share_of_steps_and_correct_only_when_all_are():
    gold = "43 49 55"
    check = grader(gold, "chain")
    assert check("43\n49\n0") == pytest.approx(2 / 3)
    assert not is_correct("43\n49\n0", gold, "chain")
    assert is_correct("43\n49\n55", gold, "chain")
    with pytest.raises(OpdcacheError, match="step values"):
        grader("forty-three", "chain")


def test_seeded_wordings_split_and_exclusion(tmp_path):
    assert sample_chains(8, 3) == sample_chains(8, 3)
    train = sample_chains(200, 4, "train")
    assert {c.wording for c in train} == set(range(len(WORDINGS) - HELD_OUT))
    held = sample_chains(50, 4, "held-out")
    assert {c.wording for c in held} == set(range(len(WORDINGS) - HELD_OUT, len(WORDINGS)))
    probe = sample_chains(40, 1, "all")
    rest = sample_chains(300, 2, exclude={c.question for c in probe})
    assert not {c.question for c in probe} & {c.question for c in rest}
    path = write_chains(tmp_path / "c.jsonl", probe)
    loaded = load_prompts(path, quiet=True)
    assert [p.answer for p in loaded] == [c.answer for c in probe]
    assert [is_held_out(p.prompt_id) for p in loaded] == [
        c.wording >= len(WORDINGS) - HELD_OUT for c in probe
    ]


def test_demo_prompts_keep_the_probe_set_out_of_training_and_the_teacher_fine_tune(tmp_path):
    import dataclasses

    from opdcache.chain import write_probe_and_train
    from opdcache.demos.real import CHAIN, CHAIN_HEAL, run_real_demo

    size = dataclasses.replace(CHAIN.size, probe_prompts=24)
    probe, train, heal_rows = write_probe_and_train(tmp_path, size.probe_prompts, CHAIN_HEAL["examples"])
    probe_q = {p.question for p in load_prompts(probe, quiet=True)}
    train_q = {p.question for p in load_prompts(train, quiet=True)}
    assert len(probe_q) == 24 and not probe_q & train_q and not probe_q & {r["question"] for r in heal_rows}
    assert all(not is_held_out(p.prompt_id) for p in load_prompts(train, quiet=True))
    assert any(is_held_out(p.prompt_id) for p in load_prompts(probe, quiet=True))
    assert all(r["solution"].count("\n") == STEPS - 1 for r in heal_rows)
    with pytest.raises(OpdcacheError, match="leave out --task chain"):
        run_real_demo(probe, tmp_path / "x", task_name="chain")
    with pytest.raises(OpdcacheError, match="--task 'sums'"):
        run_real_demo(None, tmp_path / "x", task_name="sums")
