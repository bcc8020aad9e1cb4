"""Prompt files: validation errors that name file and line, and per-round batches."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opdcache.errors import OpdcacheError
from opdcache.rollout.prompts import load_prompts, render, round_prompts


def _jsonl(tmp_path, rows):
    p = tmp_path / "p.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


OK = {"prompt_id": 1, "question": "1+1?", "answer": "2"}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([OK, "{not json"], "line 2: not valid JSON"),
        ([{"prompt_id": "a", "question": "q"}], "line 1: missing field\\(s\\) answer"),
        (
            [{"prompt_id": "a", "question": "  ", "answer": "1"}],
            "line 1: 'question' must be a non-empty string",
        ),
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
    with pytest.raises(OpdcacheError, match="row 1: missing field\\(s\\) answer"):
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
