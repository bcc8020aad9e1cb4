"""The answer extraction and the exact checker, on hand-written responses."""

import pytest

from opdcache.grading import extract_boxed, is_correct


@pytest.mark.parametrize(
    "text, want",
    [
        ("so \\boxed{12}.", "12"),
        ("\\boxed{ 3 } then \\boxed{ 7 }", "7"),  # the last box counts
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed {x^{2}+1}", "x^{2}+1"),
        ("first \\boxed{5} and a truncated \\boxed{6", "5"),  # an unclosed box is not an answer
        ("3 + 9 = 12", None),
        ("\\boxed", None),
        ("the answer is \\fbox{9}", "9"),
        ("", None),
    ],
)
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


def test_exact_checker_compares_the_boxed_string():
    assert is_correct("x = \\boxed{ 42 }", " 42 ", "exact")
    assert not is_correct("x = 42", "42", "exact")
    assert not is_correct("\\boxed{42.0}", "42", "exact")


@pytest.mark.parametrize(
    "response, gold, ok",
    [
        ("3 + 9 = 12", "12", False),  # no box: math-verify alone would fall back to the last number
        ("so far 7, 9, 12", "12", False),  # a truncated response
        ("first \\boxed{12} then \\boxed{1", "12", True),  # the last complete box
        ("\\boxed{\\frac{1}{2}}", "0.5", True),  # nested braces, an equivalent form
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
        ("\\fbox{18}", "18", True),
        ("\\boxed{19}", "18", False),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ],
)
def test_math_checker_needs_a_box(response, gold, ok):
    assert is_correct(response, gold, "math") is ok
