"""Grading a response against a gold answer: the last ``\\boxed{...}``, compared exactly or by math-verify."""

from __future__ import annotations

from typing import Literal

from opdcache.errors import OpdcacheError

Checker = Literal["math", "exact"]
_BOXED = "\\boxed"


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (nested braces matched), trimmed, or None."""
    start = text.rfind(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j].strip()
        start = text.rfind(_BOXED, 0, start)  # unclosed (truncated) box: try an earlier one
    return None


def is_correct(response: str, answer: str, checker: Checker) -> bool:
    """``exact``: boxed string equality (the toy task); ``math``: math-verify equivalence."""
    if checker == "exact":
        return extract_boxed(response) == answer.strip()
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise OpdcacheError("--checker math needs math-verify (pip install math-verify)") from e
    gold = parse(answer if "\\boxed" in answer or "$" in answer else f"${answer}$")
    return bool(gold) and bool(verify(gold, parse(response)))
