"""A synthetic long-horizon arithmetic task with exactly checkable ``\\boxed{}`` answers.

A problem ``start x add a steps n solve`` asks for x + n·a (mod 100), worked one step at a time. The
solution in the teacher's format ("compact") is n lines of 7 tokens, then ``\\boxed{ y }``::

    1 : 17 + 7 = 24 ; 2 : 24 + 7 = 31 ; ... ; \\boxed{ 3 }

The low-compatibility student is pre-trained on the "drift" format: it starts compact and may, after
a geometric number of steps (mean ``1/switch_p``; never when 0, the demo's low student), switch for
good to a verbose notation the teacher never saw (``12 then 24 plus 7 gives 31 .``); after its answer
it goes on re-checking steps backwards (``check 31 minus 7 gives 24 .``, a notation the teacher never
saw either) for a geometric number of lines (mean ``ramble`` - 1) -- the toy's version of a Base model
drifting into its own long-winded style and not stopping at the answer. With n in 8-40, compact
solutions run to 70-330 tokens; ``ramble`` = 48 adds ~280 tokens on average.

Every number 0-99 is one token, so next-number positions choose among 100 candidates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

MOD = 100
NUMBERS = [str(i) for i in range(MOD)]
WORDS = [
    "start",
    "add",
    "steps",
    "solve",
    ":",
    "+",
    "=",
    ";",
    "\\boxed{",
    "}",
    "then",
    "plus",
    "gives",
    ".",
    "check",
    "minus",
]
VOCAB = NUMBERS + WORDS
Format = Literal["compact", "drift"]


@dataclass(frozen=True)
class Problem:
    start: int
    add: int
    steps: int

    @property
    def answer(self) -> int:
        return (self.start + self.steps * self.add) % MOD

    @property
    def question(self) -> str:
        return f"start {self.start} add {self.add} steps {self.steps} solve"


def sample_problems(n: int, seed: int, min_steps: int = 8, max_steps: int = 40) -> list[Problem]:
    rng = np.random.default_rng(seed)
    return [
        Problem(int(rng.integers(MOD)), int(rng.integers(1, 10)), int(rng.integers(min_steps, max_steps + 1)))
        for _ in range(n)
    ]


def solution(
    p: Problem,
    fmt: Format = "compact",
    rng: np.random.Generator | None = None,
    switch_p: float = 0.2,
    ramble: float = 0.0,
) -> str:
    """A correct worked solution; ``drift`` switches to the verbose notation at a geometric step
    (mean ``1/switch_p``; ``switch_p`` = 0: never, the drift is then only the rambling after the answer).

    ``ramble`` > 0 (drift only): after the boxed answer, backward check lines, stopping after each
    with probability 1/ramble (mean ramble - 1) -- like a Base model that does not stop at the answer.
    """
    rng = rng or np.random.default_rng()
    switch = p.steps + 1
    if fmt == "drift" and switch_p > 0:
        switch = int(rng.geometric(switch_p))
    parts, x = [], p.start
    for i in range(1, p.steps + 1):
        y = (x + p.add) % MOD
        if i < switch:
            parts.append(f"{i} : {x} + {p.add} = {y} ;")
        else:
            parts.append(f"{i} then {x} plus {p.add} gives {y} .")
        x = y
    parts.append(f"\\boxed{{ {x} }}")
    extra = int(rng.geometric(1 / ramble)) - 1 if fmt == "drift" and ramble > 0 else 0
    for _ in range(extra):
        parts.append(f"check {x} minus {p.add} gives {(x - p.add) % MOD} .")
        x = (x - p.add) % MOD
    return " ".join(parts)


def write_prompts(path: str | Path, problems: list[Problem], prefix: str) -> Path:
    """JSONL with prompt_id, question, answer (the format every stage and ``opdcache eval`` read)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for i, p in enumerate(problems):
            f.write(
                json.dumps({"prompt_id": f"{prefix}{i}", "question": p.question, "answer": str(p.answer)})
                + "\n"
            )
    tmp.replace(path)
    return path
