"""Grading a response against a gold answer.

``math`` and ``exact`` read only the last complete ``\\boxed{}`` (or ``\\fbox{}``) of a response, as the
reference recipe's grader does: a response without one scores 0, however its last number reads. That
matters most for truncated responses, the ones Prune-OPD is about, and it is the protocol for the
paper's tasks.

``last-number`` is lm-evaluation-harness's GSM8K "flexible-extract" filter, for models too small to
box an answer (the real pair on the embedded arithmetic task, docs/real-pair.md): the last match of
``(-?[$0-9.,]{2,})|(-?[0-9]+)`` in the response, then the task's ``exact_match`` normalisation (commas,
``$``, anything up to ``#### `` and one trailing ``.`` removed, case ignored) on it and on the gold
answer, compared as strings ("5.0" is not "5", as there).

``chain`` is a graded score, not a bit: the share of a stepping chain's steps that are right (chain.py,
the long-horizon task); evaluation also reports the correct prefix (``horizon``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

from opdcache.errors import OpdcacheError

Checker = Literal["math", "exact", "last-number", "chain"]
CHECKERS: tuple[Checker, ...] = ("math", "exact", "last-number", "chain")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched), trimmed."""
    for m in reversed(list(_BOX.finditer(text))):
        depth = 0
        for j in range(m.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[m.end() : j].strip()
        # unclosed (truncated) box: try an earlier one
    return None


def extract_last_number(text: str) -> str | None:
    """The last number of a response as lm-eval's GSM8K flexible-extract reads it (before normalising)."""
    matches = _FLEXIBLE.findall(text)
    if not matches:
        return None
    wide, plain = matches[-1]
    return (wide or plain).strip()


def normalize_number(text: str) -> str:
    """lm-eval's GSM8K exact_match normalisation (regexes_to_ignore, then ignore_case)."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def grader(answer: str, checker: Checker) -> Callable[[str], float]:
    """A response -> score in [0, 1] for one gold answer (parsed once, used for all its samples): 0 or
    1 (correct?) for every checker but ``chain``, whose score is the share of steps right.

    ``exact``: the boxed string equals the answer (the toy task). ``math``: math-verify equivalence of
    the boxed content and the gold answer. ``last-number``: the normalised last number equals the
    normalised answer.
    """
    if checker == "chain":
        from opdcache.chain import horizon

        try:
            horizon("", answer)  # a gold answer that is not step values fails here, once
        except ValueError as e:
            raise OpdcacheError(f"checker chain: {e}") from e
        return lambda response: horizon(response, answer)[0]
    if checker == "last-number":
        gold_number = normalize_number(answer)

        def check_last(response: str) -> bool:
            found = extract_last_number(response)
            return found is not None and normalize_number(found) == gold_number

        return check_last
    if checker == "exact":
        gold_text = answer.strip()
        return lambda response: extract_boxed(response) == gold_text
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise OpdcacheError("--checker math needs math-verify (pip install math-verify)") from e
    gold = parse(answer if "\\boxed" in answer or "$" in answer else f"${answer}$")

    def check(response: str) -> bool:
        boxed = extract_boxed(response)
        return bool(gold) and boxed is not None and bool(verify(gold, parse(f"\\boxed{{{boxed}}}")))

    return check


def is_correct(response: str, answer: str, checker: Checker) -> bool:
    return grader(answer, checker)(response) == 1
