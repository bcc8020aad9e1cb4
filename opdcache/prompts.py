"""Prompt sets from the files users have (JSONL or Parquet), and per-round batches.

Each record gives a question, a gold answer and an id, read from the first field present in this order
(``data.fields`` / ``--field`` names another field, dotted for nested ones):

  question   ``question`` | ``problem`` | ``prompt`` (a string, or a chat message list: its last user turn)
  answer     ``answer`` (string or number; GSM8K's worked solution gives the number after ``####``) |
             ``reward_model.ground_truth`` (verl / DAPO Parquet) | the last ``\\boxed{}`` of ``solution``
  prompt_id  ``prompt_id`` | ``id`` | ``unique_id`` | ``idx`` | the record's number (0-based)

Loading says in one line what it mapped, and warns when two present candidates disagree (an export
with both ``question`` and ``problem``, or ``answer`` and ``solution``, loads; the first one wins).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from opdcache.config import render
from opdcache.errors import OpdcacheError
from opdcache.grading import extract_boxed
from opdcache.rundir import write_text_if_changed

CANDIDATES: dict[str, tuple[str, ...]] = {
    "question": ("question", "problem", "prompt"),
    "answer": ("answer", "reward_model.ground_truth", "solution"),
    "prompt_id": ("prompt_id", "id", "unique_id", "idx"),
}
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    question: str
    answer: str


@dataclass
class PromptSet:
    prompts: list[Prompt]
    mapping: dict[str, str]  # role -> the field it was read from ("#" for the record number)
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return ", ".join(f"{role} <- {src}" for role, src in self.mapping.items())


def _get(row: Mapping[str, Any], dotted: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _question(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list | np.ndarray):  # chat messages: the last user turn
        users = [m.get("content") for m in value if isinstance(m, Mapping) and m.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    return None


def _answer(value: Any, source: str) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if not isinstance(value, str):
        return None
    if source.endswith("solution"):
        return extract_boxed(value)
    if m := _GSM8K_FINAL.search(value):  # GSM8K: worked solution ending in "#### 1,234"
        return re.sub(r"(?<=\d),(?=\d{3}\b)", "", m.group(1))
    return value.strip()


_CONVERT = {
    "question": lambda v, s: _question(v),
    "answer": _answer,
    "prompt_id": lambda v, s: None if v is None else str(v),
}


def read_prompt_set(path: str | Path, fields: Mapping[str, str] | None = None) -> PromptSet:
    """Read and validate a prompt file; every error names the file and line/row."""
    path = Path(path)
    fields = dict(fields or {})
    if unknown := sorted(set(fields) - set(CANDIDATES)):
        raise OpdcacheError(f"data.fields: unknown role(s) {unknown}; expected {', '.join(CANDIDATES)}")
    rows, where = _records(path)
    if not rows:
        raise OpdcacheError(f"{path}: no prompts")
    order = {role: (fields[role],) if role in fields else cands for role, cands in CANDIDATES.items()}
    mapping: dict[str, str] = {}
    disagree: dict[tuple[str, str, str], list[int]] = {}
    out, seen = [], {}
    for i, row in enumerate(rows):
        loc = f"{path}: {where} {i + 1}"
        if not isinstance(row, Mapping):
            raise OpdcacheError(f"{loc}: expected an object with a question and an answer")
        got: dict[str, str] = {}
        for role, cands in order.items():
            present = [(c, _CONVERT[role](_get(row, c), c)) for c in cands if _get(row, c) is not None]
            present = [(c, v) for c, v in present if v is not None and (role != "question" or v.strip())]
            if present:
                src, got[role] = present[0]
                mapping.setdefault(role, src)
                for other, v in present[1:]:
                    if v.strip() != got[role].strip():
                        disagree.setdefault((role, src, other), []).append(i)
            elif role == "prompt_id" and role not in fields:
                got[role] = str(i)
                mapping.setdefault(role, "#")
            else:
                looked = ", ".join(cands)
                raise OpdcacheError(
                    f"{loc}: no usable {role} (looked for {looked}"
                    + ("; a solution counts only with a \\boxed{} answer" if role == "answer" else "")
                    + "); name the field with data.fields / --field"
                )
        pid = got["prompt_id"]
        if pid in seen:
            raise OpdcacheError(f"{loc}: duplicate prompt_id {pid!r} (first at {where} {seen[pid] + 1})")
        seen[pid] = i
        out.append(Prompt(pid, got["question"], got["answer"]))
    warnings = [
        f"{path}: {role} from {src!r} and {other!r} disagree on {len(idx)} of {len(rows)} records "
        f"(first: {where} {idx[0] + 1}); using {src!r}"
        for (role, src, other), idx in disagree.items()
    ]
    return PromptSet(out, {r: mapping[r] for r in CANDIDATES if r in mapping}, warnings)


def _records(path: Path) -> tuple[list[Any], str]:
    if not path.exists():
        raise OpdcacheError(f"{path}: prompt file does not exist")
    if path.is_dir():
        raise OpdcacheError(f"{path}: is a directory; expected a JSONL or Parquet prompt file")
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist(), "row"
        except (OSError, pa.ArrowException) as e:
            raise OpdcacheError(f"{path}: not a readable Parquet file ({e})") from e
    rows = []
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise OpdcacheError(
                    f"{path}: line {i + 1}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "JSONL prompt files must be UTF-8"
                ) from e
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise OpdcacheError(f"{path}: line {i + 1}: not valid JSON ({e.msg})") from e
    return rows, "line"


def load_prompts(
    path: str | Path, fields: Mapping[str, str] | None = None, quiet: bool = False
) -> list[Prompt]:
    """The prompts of a file; unless ``quiet``, says on stderr what was mapped and what disagreed."""
    ps = read_prompt_set(path, fields)
    if not quiet:
        print(f"opdcache: {path}: {len(ps.prompts)} prompts ({ps.describe()})", file=sys.stderr)
        for w in ps.warnings:
            print(f"opdcache: warning: {w}", file=sys.stderr)
    return ps.prompts


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


def encode_prompts(tokenizer: Any, prompts: list[Prompt], template: str, chat: bool) -> list[list[int]]:
    """Token ids of each rendered prompt (wrapped in the tokenizer's chat template when ``chat``)."""
    if chat and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise OpdcacheError(
            f"{name}: has no chat template (tokenizer_config.json / chat_template.jinja), but the chat "
            "template was asked for (data.chat_template / --chat-template); leave it off for this model"
        )
    out = []
    for pr in prompts:
        text = render(pr.question, template)
        if chat:
            # return_dict=True is transformers 5's default (a mapping, not a list): ask for it explicitly
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise OpdcacheError(f"prompt {pr.prompt_id!r}: renders to zero tokens")
        out.append(list(ids))
    return out


def split_prompt_file(source: str | Path, data: Path, first: int, need: int, why: str) -> tuple[Path, Path]:
    """DATA/probe.jsonl (the first ``first`` prompts of ``source``) and train.jsonl (the rest), with
    prompt ids ``<file stem>-<row>``; fewer than ``need`` prompts is an error that says ``why``."""
    prompts = load_prompts(source, quiet=True)
    if len(prompts) < need:
        raise OpdcacheError(f"{source}: {len(prompts)} prompts; {why}")
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("probe", prompts[:first]), ("train", prompts[first:])):
        text = "".join(
            json.dumps({"prompt_id": p.prompt_id, "question": p.question, "answer": p.answer}) + "\n"
            for p in rows
        )
        write_text_if_changed(data / f"{name}.jsonl", text)
    return data / "probe.jsonl", data / "train.jsonl"
