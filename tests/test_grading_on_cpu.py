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


@pytest.mark.parametrize(
    "response, gold, ok",
    [
        ("6 x 7 = 42.", "42", True),  # one trailing period is ignored
        ("The total is 1,234 apples", "1234", True),  # commas are ignored
        ("It costs $18", "18", True),
        ("Answer: 7", "7", True),  # a single digit (the second alternative)
        ("I think 42, no wait, 43", "42", False),  # the last number counts
        ("no number here", "7", False),
        ("5.0", "5", False),  # compared as strings, as lm-eval does
        ("it is -3", "-3", True),
        ("#### 72", "72", True),
        ("3 + 9 = 12\n\nSo, 12 is the answer!", "12", True),
        ("", "0", False),
    ],
)
def test_last_number_checker_is_lm_evals_flexible_extract(response, gold, ok):
    # expected values worked by hand from lm-eval's gsm8k "flexible-extract" filter: the last match of
    # (-?[$0-9.,]{2,})|(-?[0-9]+), then exact_match ignoring ",", "$", ".*#### " and a trailing "."
    assert is_correct(response, gold, "last-number") is ok
