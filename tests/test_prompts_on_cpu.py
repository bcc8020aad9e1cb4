"""Prompt files: validation errors that name file and line, and per-round batches."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opdcache.config import render
from opdcache.errors import OpdcacheError
from opdcache.prompts import load_prompts, read_prompt_set, round_prompts


def _jsonl(tmp_path, rows):
    p = tmp_path / "p.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


OK = {"prompt_id": 1, "question": "1+1?", "answer": "2"}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([OK, "{not json"], "line 2: not valid JSON"),
        (
            [{"prompt_id": "a", "question": "q"}],
            "line 1: no usable answer \\(looked for answer, reward_model",
        ),
        (
            [{"prompt_id": "a", "question": "  ", "answer": "1"}],
            "line 1: no usable question \\(looked for question, problem, prompt",
        ),
        ([{"problem": "p", "solution": "no box here"}], "line 1: no usable answer .*only with a \\\\boxed"),
        ([OK, OK], "line 2: duplicate prompt_id '1' \\(first at line 1\\)"),
        ([[1, 2]], "line 1: expected an object"),
        ([], "no prompts"),
    ],
)
def test_bad_jsonl(tmp_path, rows, message):
    path = _jsonl(tmp_path, rows)
    with pytest.raises(OpdcacheError, match=message) as e:
        load_prompts(path)
    assert str(path) in str(e.value)


def test_parquet_and_missing_file(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "question": ["x", "y"], "answer": ["1", "2"]}), p)
    assert [x.prompt_id for x in load_prompts(p)] == ["a", "b"]
    pq.write_table(pa.table({"prompt_id": ["a"], "question": ["x"]}), p)
    with pytest.raises(OpdcacheError, match="row 1: no usable answer"):
        load_prompts(p)
    with pytest.raises(OpdcacheError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


def test_round_batches_are_seeded_and_cover_each_epoch(tmp_path):
    prompts = load_prompts(
        _jsonl(tmp_path, [{"prompt_id": i, "question": f"q{i}", "answer": "0"} for i in range(10)])
    )
    r0 = round_prompts(prompts, 0, 4, seed=7)
    assert r0 == round_prompts(prompts, 0, 4, seed=7) != round_prompts(prompts, 0, 4, seed=8)
    epoch = [p.prompt_id for r in range(5) for p in round_prompts(prompts, r, 4, seed=7)]
    assert sorted(epoch[:10]) == sorted(str(i) for i in range(10))  # rounds 0-2 cover epoch 0 once
    assert sorted(epoch[10:20]) == sorted(str(i) for i in range(10))


def test_dapo_template():
    from opdcache.config import DataConfig

    assert render("What is 2+2?", DataConfig().template) == (
        "What is 2+2? Please reason step by step, and put your final answer within \\boxed{}."
    )


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(
    "row, want, mapping",
    [
        (  # GSM8K: the number after ####, thousands separators dropped; id = record number
            {"question": "How many?", "answer": "4 + 1,996 = <<4+1996=2000>>2,000\n#### 2,000"},
            ("0", "How many?", "2000"),
            "question <- question, answer <- answer, prompt_id <- #",
        ),
        (  # MATH-500
            {
                "problem": "Find x.",
                "solution": "so \\boxed{\\frac{1}{2}}",
                "answer": "\\frac{1}{2}",
                "unique_id": "t/1",
            },
            ("t/1", "Find x.", "\\frac{1}{2}"),
            "question <- problem, answer <- answer, prompt_id <- unique_id",
        ),
        (  # an AIME export: numeric answer, integer id
            {"id": 7, "problem": "Compute N.", "answer": 204},
            ("7", "Compute N.", "204"),
            "question <- problem, answer <- answer, prompt_id <- id",
        ),
        (  # only a worked solution: its last box
            {"idx": "a", "question": "q?", "solution": "\\boxed{1} no, \\boxed{2}"},
            ("a", "q?", "2"),
            "question <- question, answer <- solution, prompt_id <- idx",
        ),
    ],
)
def test_common_shapes_load_without_flags(tmp_path, row, want, mapping):
    ps = read_prompt_set(_jsonl(tmp_path, [row]))
    p = ps.prompts[0]
    assert (p.prompt_id, p.question, p.answer) == want
    assert ps.describe() == mapping and ps.warnings == []


def test_verl_parquet_with_chat_prompt_and_nested_ground_truth(tmp_path):
    path = tmp_path / "dapo.parquet"
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"Solve {i}."}],
            "reward_model": {"ground_truth": str(10 + i), "style": "rule"},
            "extra_info": {"index": i},
        }
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    ps = read_prompt_set(path)
    assert [(p.prompt_id, p.question, p.answer) for p in ps.prompts] == [
        ("0", "Solve 0.", "10"),
        ("1", "Solve 1.", "11"),
        ("2", "Solve 2.", "12"),
    ]
    assert ps.describe() == "question <- prompt, answer <- reward_model.ground_truth, prompt_id <- #"
    by_field = read_prompt_set(path, {"prompt_id": "extra_info.index"})
    assert [p.prompt_id for p in by_field.prompts] == ["0", "1", "2"]
    assert by_field.mapping["prompt_id"] == "extra_info.index"


def test_disagreeing_candidates_load_with_a_warning_and_fields_override(tmp_path, capsys):
    rows = [
        {"id": "a", "question": "Q1", "problem": "P1", "answer": "3", "solution": "\\boxed{3}"},
        {"id": "b", "question": "Q2", "problem": "Q2", "answer": "4", "solution": "\\boxed{5}"},
    ]
    path = _jsonl(tmp_path, rows)
    ps = read_prompt_set(path)
    assert [(p.question, p.answer) for p in ps.prompts] == [("Q1", "3"), ("Q2", "4")]  # the first wins
    assert len(ps.warnings) == 2
    assert "'question' and 'problem' disagree on 1 of 2" in ps.warnings[0].replace("question from ", "")
    assert "'answer' and 'solution' disagree on 1 of 2 records (first: line 2)" in ps.warnings[1].replace(
        "answer from ", ""
    )
    load_prompts(path)
    err = capsys.readouterr().err
    assert "2 prompts (question <- question, answer <- answer, prompt_id <- id)" in err and "warning" in err
    over = read_prompt_set(path, {"question": "problem", "answer": "solution"})
    assert [(p.question, p.answer) for p in over.prompts] == [("P1", "3"), ("Q2", "5")]
    with pytest.raises(OpdcacheError, match="line 1: no usable answer \\(looked for nope"):
        read_prompt_set(path, {"answer": "nope"})
    with pytest.raises(OpdcacheError, match="unknown role"):
        read_prompt_set(path, {"gold": "answer"})


@pytest.mark.skipif(not (SHARED / "gsm8k_test.jsonl").exists(), reason="shared data not present")
def test_real_gsm8k_and_math500_load_as_they_are():
    gsm = read_prompt_set(SHARED / "gsm8k_test.jsonl")
    rows = [json.loads(line) for line in (SHARED / "gsm8k_test.jsonl").read_text().splitlines()]
    assert len(gsm.prompts) == len(rows) == 1319
    for p, row in zip(gsm.prompts, rows, strict=True):  # the number after ####, written out here
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert p.answer == final and p.question == row["question"]
    assert gsm.prompts[0].answer == "18"
    math = read_prompt_set(SHARED / "math500_test.jsonl")
    rows = [json.loads(line) for line in (SHARED / "math500_test.jsonl").read_text().splitlines()]
    assert len(math.prompts) == 500
    assert [(p.prompt_id, p.question, p.answer) for p in math.prompts] == [
        (r["unique_id"], r["problem"], r["answer"]) for r in rows
    ]


def test_init_checks_the_prompt_file_before_writing(tmp_path, capsys):
    from opdcache.cli import main

    bad = _jsonl(tmp_path, [{"question": "q"}])
    run = tmp_path / "run"
    assert main(["init", str(run), "--set", f"data.prompts={bad}"]) == 2
    assert "no usable answer" in capsys.readouterr().err
    assert not (run / "config.yaml").exists() and not (run / "budget.json").exists()
    good = _jsonl(tmp_path, [{"problem": "q", "answer": 1}])
    assert (
        main(["init", str(run), "--set", f"data.prompts={good}", "--set", "data.fields={prompt_id: problem}"])
        == 0
    )
    assert (
        "1 prompts (question <- problem, answer <- answer, prompt_id <- problem)" in capsys.readouterr().err
    )


def test_chat_template_prompts_are_token_ids(tmp_path):
    """transformers 5 returns a mapping from apply_chat_template(tokenize=True); the ids must come out."""
    from opdcache.models.tiny import build_tokenizer
    from opdcache.prompts import Prompt, encode_prompts

    tok = build_tokenizer(tmp_path / "tok")
    tok.chat_template = "{% for m in messages %}<w1> {{ m['content'] }} <w2>{% endfor %}<w3>"
    ids = encode_prompts(tok, [Prompt("a", "<w5> <w6>", "1")], "{question}", chat=True)
    assert ids == [tok("<w1> <w5> <w6> <w2><w3>", add_special_tokens=False).input_ids]
    assert all(isinstance(i, int) for i in ids[0]) and len(ids[0]) >= 5
