"""Grading a response against a gold answer: the last ``\\boxed{...}``, compared exactly or by math-verify.

Both checkers read only the last complete ``\\boxed{}`` (or ``\\fbox{}``) of a response, as the
reference recipe's grader does: a response without one scores 0, however its last number reads. That
matters most for truncated responses, the ones Prune-OPD is about.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

from opdcache.errors import OpdcacheError

Checker = Literal["math", "exact"]
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


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


def grader(answer: str, checker: Checker) -> Callable[[str], bool]:
    """A response -> correct? function for one gold answer (parsed once, used for all its samples).

    ``exact``: the boxed string equals the answer (the toy task). ``math``: math-verify equivalence of
    the boxed content and the gold answer.
    """
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
    return grader(answer, checker)(response)
