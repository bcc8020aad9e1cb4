"""Stepping chains: the embedded long-horizon task (issue 40), graded by its horizon.

"Start at 37 and add 6, 20 times; one line a step" is answered as ``37 + 6 = 43``, ``43 + 6 = 49``, ...
Each line starts from the last line's result, so one slip changes every later value: the student's
answer is long (20 lines, ~220 tokens) and its errors compound, the shape Prune-OPD is made for.

Grading (``eval.checker: chain``) reads the last integer of each line that holds a digit and compares
line i with the gold value of step i:

  steps   the share of steps right (what ``accuracy`` is for this checker);
  prefix  the share of steps before the first wrong one: the correct horizon.

SmolLM2-135M-Instruct cannot do it (0.02 of the steps, greedy; docs/real-pair.md), so the real demo's
teacher on this task is that model fine-tuned on worked chains first (:func:`worked_answer`,
models/heal.py), and its students are that teacher with layers removed: prune-then-heal, as Minitron.

As in arithmetic.py, the last ``HELD_OUT`` wordings never appear in training prompts (nor in the
teacher's fine-tuning data); the probe set uses every wording. Ids read ``chain-w<wording>-<n>``; the
gold answer is the step values separated by spaces.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from opdcache.rundir import write_text_if_changed

Wordings = Literal["train", "held-out", "all"]
STEPS = 20  # additions per chain: ~220 answer tokens with SmolLM2's one-token digits
HELD_OUT = 2
WORDINGS = (
    "Start at {a} and add {d}, {n} times. Write each step on its own line.",
    "Begin with {a}. Keep adding {d} until you have added it {n} times, one line per step.",
    "Count up from {a} in steps of {d}: write {n} additions, one per line.",
    "Add {d} to {a}, then add {d} to the result, and so on, {n} times. Show every step.",
    "Starting from {a}, repeatedly add {d}. Show all {n} steps, one per line.",
    "Write {n} lines, each adding {d} to the previous result, starting at {a}.",
    # held out of training
    "Take {a} and add {d} to it {n} times, showing each sum on a new line.",
    "From {a}, step up by {d} a total of {n} times; write each step as an addition.",
)
_NUMBER = re.compile(r"-?\d+")
_ID = re.compile(r"^chain-w(\d+)-\d+$")


@dataclass(frozen=True)
class Chain:
    start: int
    step: int
    n: int
    wording: int

    @property
    def question(self) -> str:
        return WORDINGS[self.wording].format(a=self.start, d=self.step, n=self.n)

    @property
    def values(self) -> list[int]:
        """The gold result of each step: start + step * i, i = 1..n."""
        return [self.start + self.step * i for i in range(1, self.n + 1)]

    @property
    def answer(self) -> str:
        return " ".join(map(str, self.values))


def worked_answer(c: Chain) -> str:
    """The answer the teacher is fine-tuned on: one ``prev + step = next`` line per step."""
    prev = [c.start, *c.values[:-1]]
    return "\n".join(f"{p} + {c.step} = {v}" for p, v in zip(prev, c.values, strict=True))


def _wording_ids(wordings: Wordings) -> range:
    n = len(WORDINGS)
    return {"train": range(n - HELD_OUT), "held-out": range(n - HELD_OUT, n), "all": range(n)}[wordings]


def sample_chains(
    n: int, seed: int, wordings: Wordings = "train", steps: int = STEPS, exclude: set[str] = frozenset()
) -> list[Chain]:
    """``n`` chains (start 10-59, step 2-9), the same for one seed; ``exclude``: questions to skip."""
    if n < 0 or steps < 1:
        raise ValueError(f"sample_chains: n >= 0 and steps >= 1 expected, got {n}, {steps}")
    rng = np.random.default_rng(seed)
    ids = _wording_ids(wordings)
    out: list[Chain] = []
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        c = Chain(
            int(rng.integers(10, 60)), int(rng.integers(2, 10)), steps, ids[int(rng.integers(len(ids)))]
        )
        if c.question not in exclude:
            out.append(c)
    raise ValueError(f"sample_chains: cannot draw {n} chains outside the {len(exclude)} excluded")


def write_chains(path: str | Path, chains: list[Chain], prefix: str = "chain") -> Path:
    """JSONL with prompt_id, question, answer (the step values) and the worked solution."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for i, c in enumerate(chains):
            row = {"prompt_id": f"{prefix}-w{c.wording}-{i}", "question": c.question, "answer": c.answer,
                   "solution": worked_answer(c)}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def step_values(response: str) -> list[int]:
    """The value each line of a response arrives at: the last integer of every line with a digit."""
    return [int(m[-1]) for line in response.splitlines() if (m := _NUMBER.findall(line))]


def horizon(response: str, answer: str) -> tuple[float, float]:
    """(share of steps right, share of steps before the first wrong one) of a response against the
    gold step values ``answer`` (space-separated integers). Line i is compared with step i only."""
    try:
        gold = [int(x) for x in answer.split()]
    except ValueError:
        gold = []
    if not gold:
        raise ValueError(f"gold answer {answer!r}: expected the step values, space-separated integers")
    got = step_values(response)
    hits = [i < len(got) and got[i] == g for i, g in enumerate(gold)]
    prefix = hits.index(False) if False in hits else len(gold)
    return sum(hits) / len(gold), prefix / len(gold)


def is_held_out(prompt_id: str) -> bool:
    m = _ID.match(prompt_id)
    return m is not None and int(m.group(1)) >= len(WORDINGS) - HELD_OUT


SEEDS = (1, 2, 3)  # the probe set's, the training prompts' and the teacher's fine-tuning data's
RESERVED = 48  # questions of the probe set's draw kept out of training and fine-tuning, whatever its size
TRAIN_PROMPTS = 4096


def write_probe_and_train(
    data: Path, probe_prompts: int, heal_examples: int
) -> tuple[Path, Path, list[dict[str, str]]]:
    """DATA/probe.jsonl (every wording), train.jsonl (trained wordings, none of the probe's questions)
    and ``heal_examples`` rows of the teacher's fine-tuning data (the same)."""
    reserved = sample_chains(max(RESERVED, probe_prompts), SEEDS[0], "all")
    probe = reserved[:probe_prompts]  # draws are prefixes of each other: one seed, one sequence
    held = {c.question for c in reserved}
    heal = sample_chains(heal_examples, SEEDS[2], "train", exclude=held)
    train = sample_chains(TRAIN_PROMPTS, SEEDS[1], "train", exclude=held)
    data.mkdir(parents=True, exist_ok=True)
    for name, chains in (("probe", probe), ("train", train)):
        tmp = write_chains(data / f".{name}.draft.jsonl", chains)
        write_text_if_changed(data / f"{name}.jsonl", tmp.read_text())
        tmp.unlink()
    rows = [
        {"prompt_id": f"heal-{i}", "question": c.question, "solution": worked_answer(c)}
        for i, c in enumerate(heal)
    ]
    return data / "probe.jsonl", data / "train.jsonl", rows
