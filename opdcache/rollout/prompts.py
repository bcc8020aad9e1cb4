"""Prompt sets: JSONL or Parquet with ``prompt_id``, ``question``, ``answer``; per-round batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from opdcache.errors import OpdcacheError

REQUIRED = ("prompt_id", "question", "answer")


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    question: str
    answer: str


def _check(rows: list[dict], path: Path, where: str) -> list[Prompt]:
    out, seen = [], {}
    for i, row in enumerate(rows):
        loc = f"{path}: {where} {i + 1}"
        if not isinstance(row, dict):
            raise OpdcacheError(f"{loc}: expected an object with {', '.join(REQUIRED)}")
        missing = [k for k in REQUIRED if k not in row or row[k] is None]
        if missing:
            raise OpdcacheError(f"{loc}: missing field(s) {', '.join(missing)}")
        pid = str(row["prompt_id"])
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise OpdcacheError(f"{loc}: 'question' must be a non-empty string")
        if pid in seen:
            raise OpdcacheError(f"{loc}: duplicate prompt_id {pid!r} (first at {where} {seen[pid] + 1})")
        seen[pid] = i
        out.append(Prompt(pid, row["question"], str(row["answer"])))
    if not out:
        raise OpdcacheError(f"{path}: no prompts")
    return out


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read and validate a prompt file; every error names the file and line/row."""
    path = Path(path)
    if not path.exists():
        raise OpdcacheError(f"{path}: prompt file does not exist")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise OpdcacheError(f"{path}: not a readable Parquet file ({e})") from e
        return _check(table.to_pylist(), path, "row")
    rows = []
    with path.open() as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise OpdcacheError(f"{path}: line {i + 1}: not valid JSON ({e.msg})") from e
    return _check(rows, path, "line")


def round_prompts(prompts: list[Prompt], r: int, per_round: int, seed: int) -> list[Prompt]:
    """Round ``r``'s batch: consecutive slices of a seeded shuffle, reshuffled each epoch."""
    n = len(prompts)
    out: list[Prompt] = []
    start = r * per_round
    while len(out) < per_round:
        epoch, offset = divmod(start + len(out), n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(per_round - len(out), n - offset)
        out.extend(prompts[i] for i in order[offset : offset + take])
    return out


def render(question: str, template: str) -> str:
    """Apply the prompt template (``str.format`` with ``{question}``)."""
    return template.format(question=question)


def encode_prompts(tokenizer: Any, prompts: list[Prompt], template: str, chat: bool) -> list[list[int]]:
    """Token ids of each rendered prompt (wrapped in the tokenizer's chat template when ``chat``)."""
    out = []
    for pr in prompts:
        text = render(pr.question, template)
        if chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
        else:
            ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise OpdcacheError(f"prompt {pr.prompt_id!r}: renders to zero tokens")
        out.append(list(ids))
    return out
