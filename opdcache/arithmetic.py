"""Simple arithmetic with gold answers: the embedded task the real pair is graded on (no download).

SmolLM2-135M-Instruct answers simple arithmetic some of the time and its depth-pruned students almost
never (docs/real-pair.md), so this is where distillation has a gap to close that can be graded. Three
kinds, each asked in several wordings:

  product  a × b, one digit each (2-9)
  sum      ab + cd, two digits each (10-99)
  word     a one-step word problem: more, fewer, or equal groups (results ≤ 81)

The last ``HELD_OUT`` wordings of each kind never appear in training prompts: a probe set drawn with
``wordings="all"`` checks whether a student learned arithmetic or a template. Gold answers are
integers, graded with ``eval.checker: last-number`` (grading.py). Ids read
``arith-<kind>-w<wording>-<n>``; :func:`is_held_out` tells held-out wordings from trained ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from opdcache.rundir import write_text_if_changed

Kind = Literal["product", "sum", "word"]
KINDS: tuple[Kind, ...] = ("product", "sum", "word")
Wordings = Literal["train", "held-out", "all"]
HELD_OUT = 2  # wordings per kind kept out of training prompts

NAMES = ("Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Zoe")
THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells")

PRODUCT = (
    "What is {a} × {b}?",
    "What is {a} times {b}?",
    "Compute {a} * {b}.",
    "Multiply {a} by {b}.",
    "What is the product of {a} and {b}?",
    "Calculate {a} x {b}.",
    "How much is {a} times {b}?",
    "{a} multiplied by {b} equals what?",
)
SUM = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "What is the sum of {a} and {b}?",
    "Calculate {a} + {b}.",
    "How much is {a} plus {b}?",
    "Find the total of {a} and {b}.",
)
# (template, operation): "+" a + b, "-" a - b, "*" a groups of b
WORD = (
    ("{name} has {a} {things}. {name} gets {b} more. How many {things} does {name} have now?", "+"),
    ("{name} had {a} {things} and gave {b} to a friend. How many {things} are left?", "-"),
    ("Each box holds {b} {things}. How many {things} are in {a} boxes?", "*"),
    ("There are {a} {things} on a table and {b} {things} in a bag. How many {things} are there in all?", "+"),
    ("A shop had {a} {things}. It sold {b} of them. How many {things} does the shop have left?", "-"),
    ("{name} buys {a} packs of {things} with {b} in each pack. How many {things} does {name} buy?", "*"),
    ("{name} found {a} {things} in the morning and {b} in the afternoon. How many {things} in total?", "+"),
    ("{a} children each bring {b} {things}. How many {things} do they bring altogether?", "*"),
)
WORDINGS: dict[Kind, int] = {"product": len(PRODUCT), "sum": len(SUM), "word": len(WORD)}
_ID = re.compile(r"^arith-(product|sum|word)-w(\d+)-\d+$")


@dataclass(frozen=True)
class ArithProblem:
    kind: Kind
    wording: int  # index into the kind's wordings
    question: str
    answer: int


def _operands(kind: Kind, op: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(a, b, answer) for one problem of ``kind`` (``op`` the word problem's operation)."""
    if kind == "product":
        a, b = (int(x) for x in rng.integers(2, 10, size=2))
        return a, b, a * b
    if kind == "sum":
        a, b = (int(x) for x in rng.integers(10, 100, size=2))
        return a, b, a + b
    if op == "+":
        a, b = (int(x) for x in rng.integers(2, 21, size=2))
        return a, b, a + b
    if op == "-":
        a = int(rng.integers(10, 31))
        b = int(rng.integers(2, a))
        return a, b, a - b
    a, b = (int(x) for x in rng.integers(2, 10, size=2))
    return a, b, a * b


def _wording_ids(kind: Kind, wordings: Wordings) -> range:
    n = WORDINGS[kind]
    return {"train": range(n - HELD_OUT), "held-out": range(n - HELD_OUT, n), "all": range(n)}[wordings]


def problem(kind: Kind, wording: int, rng: np.random.Generator) -> ArithProblem:
    """One problem of ``kind`` in wording ``wording``, its numbers (and name / things) drawn from ``rng``."""
    if kind == "word":
        template, op = WORD[wording]
    else:
        template, op = (PRODUCT if kind == "product" else SUM)[wording], ""
    a, b, answer = _operands(kind, op, rng)
    name, things = NAMES[int(rng.integers(len(NAMES)))], THINGS[int(rng.integers(len(THINGS)))]
    return ArithProblem(kind, wording, template.format(a=a, b=b, name=name, things=things), answer)


def sample_arithmetic(
    n: int,
    seed: int,
    wordings: Wordings = "train",
    kinds: Iterable[Kind] = KINDS,
    exclude: Iterable[str] = (),
) -> list[ArithProblem]:
    """``n`` problems, kinds in turn, wordings uniform within ``wordings``, the same for one seed.

    ``exclude``: question texts to skip (a training set drawn without the probe set's questions).
    """
    kinds = tuple(kinds)
    if n < 0 or not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"sample_arithmetic: n >= 0 and kinds from {KINDS} expected, got {n}, {kinds}")
    rng = np.random.default_rng(seed)
    skip = set(exclude)
    out: list[ArithProblem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"sample_arithmetic: cannot draw {n} problems outside the {len(skip)} excluded")
        kind = kinds[len(out) % len(kinds)]
        ids = _wording_ids(kind, wordings)
        p = problem(kind, ids[int(rng.integers(len(ids)))], rng)
        if p.question not in skip:
            out.append(p)
    return out


def prompt_ids(problems: list[ArithProblem], prefix: str = "arith") -> list[str]:
    return [f"{prefix}-{p.kind}-w{p.wording}-{i}" for i, p in enumerate(problems)]


def write_arithmetic(path: str | Path, problems: list[ArithProblem]) -> Path:
    """JSONL with prompt_id, question, answer (what every stage and ``opdcache eval`` read), kind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for pid, p in zip(prompt_ids(problems), problems, strict=True):
            row = {"prompt_id": pid, "question": p.question, "answer": str(p.answer), "kind": p.kind}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def parse_id(prompt_id: str) -> tuple[Kind, int] | None:
    """(kind, wording) of an arithmetic prompt id; None for any other id."""
    m = _ID.match(prompt_id)
    return (m.group(1), int(m.group(2))) if m else None  # type: ignore[return-value]


def is_held_out(prompt_id: str) -> bool:
    """Whether an arithmetic prompt uses a wording kept out of training."""
    parsed = parse_id(prompt_id)
    return parsed is not None and parsed[1] >= WORDINGS[parsed[0]] - HELD_OUT


SEEDS = (1, 2)  # the probe set's and the training prompts' generator seeds
TRAIN_PROMPTS = 4096


def write_probe_and_train(data: Path, probe_prompts: int) -> tuple[Path, Path]:
    """DATA/probe.jsonl (``probe_prompts`` problems, every wording) and train.jsonl (the training
    wordings only, none of the probe's questions), each rewritten only when it changed."""
    probe = sample_arithmetic(probe_prompts, SEEDS[0], wordings="all")
    train = sample_arithmetic(TRAIN_PROMPTS, SEEDS[1], wordings="train", exclude=[p.question for p in probe])
    data.mkdir(parents=True, exist_ok=True)
    for name, problems in (("probe", probe), ("train", train)):
        tmp = write_arithmetic(data / f".{name}.draft.jsonl", problems)
        write_text_if_changed(data / f"{name}.jsonl", tmp.read_text())
        tmp.unlink()
    return data / "probe.jsonl", data / "train.jsonl"
