"""Grader run integrity: the worst strings we can write come back within timeout_s plus a small constant, in
whichever stage they settle (the in-process fast stages have no timeout, so they must be fast on their own).

Bounds are generous for a busy 2-core machine; the code before the fix took 27-100 s on a 100,000-digit answer.
"""

import time

import pytest

from utils.drgrpo_grader import MAX_ANSWER_CHARS, _settle, grade_batch, normalize_answer, r1_zero_reward_fn
from utils.exact_math import MAX_LIST_ITEMS


def _worst(size: int) -> dict[str, str]:
    """Inputs of about `size` characters that were (or could be) superlinear somewhere in the grader."""
    return {
        "digits": "1" * size,
        "decimal": "0." + "3" * size,
        "digits_then_dot": "1" * size + ".",
        "thousands": "1" + ",000" * (size // 4),
        "list_commas": "1, " * (size // 3),
        "spaces": "1" + " " * size + "x",
        "letters": "\\" + "a" * size,
        "nested_parens": "(" * (size // 2) + "1" + ")" * (size // 2),
        "nested_braces": "{" * (size // 2) + "1" + "}" * (size // 2),
        "nested_frac": "\\frac{1}{" * (size // 9) + "2" + "}" * (size // 9),
        "boxes": "\\boxed{1} " * (size // 10),
        "open_boxes": "\\boxed{" * (size // 7),
        "dollars": "$1$ " * (size // 4),
        "open_parens_math": "\\(" * (size // 2),
        "factorials": "3" + "!" * size,
        "power_tower": "2" + "^2" * (size // 2),
        "repeating": "0." + "\\overline{3}" * (size // 12),
        "list_words": "1 and " * (size // 6),
        "percent_words": "1 percent " * (size // 10),
        "equations": "x=" * (size // 2) + "1",
        "long_list": ",".join(str(i) for i in range(size // 5)),
    }


WORST = {**{f"{k}_100k": v for k, v in _worst(100_000).items()},
         **{f"{k}_under_cap": v[:MAX_ANSWER_CHARS - 10] for k, v in _worst(MAX_ANSWER_CHARS).items()}}
# At most MAX_LIST_ITEMS items, each a polynomial: the fast stage compares every pair.
WORST["polynomial_list"] = ",".join(f"x^{{{i}}}+{i}" for i in range(MAX_LIST_ITEMS))
WORST["tuple_list"] = ",".join(f"({i},{i + 1})" for i in range(MAX_LIST_ITEMS))


def _r1(answer: str) -> str:
    return f"Reasoning. </think> <answer> {answer} </answer>"


@pytest.mark.parametrize("name", sorted(WORST))
def test_fast_stages_are_fast_on_worst_inputs(name):
    answer = WORST[name]
    start = time.monotonic()
    for fast in (True, False):
        assert _settle(answer, "2", fast) in (False, None)
        _settle(answer, answer[::-1], fast)
        _settle("(1,2)", answer, fast)
    normalize_answer(answer)
    r1_zero_reward_fn(_r1(answer), "2") if len(answer) > MAX_ANSWER_CHARS else None  # settles without sympy
    assert time.monotonic() - start < 5.0  # milliseconds normally; the quadratic regexes took 27-100 s


def test_grade_batch_returns_every_worst_input_within_its_timeout():
    names = sorted(WORST)
    responses = [_r1(WORST[n]) for n in names] + [_r1(r"\log_2 8")]
    timeout_s = 2.0
    start = time.monotonic()
    results = grade_batch(responses, ["2"] * len(names) + ["3"], workers=2, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    sent = sum(r["settled_by"] != "fast" for r in results)
    # each worker item costs at most timeout_s; 60 s covers starting two workers (sympy import) on a busy machine
    assert elapsed < 60 + sent * timeout_s / 2
    assert all(r["reward"] == 0.0 for r in results[:-1]) and results[-1]["reward"] == 1.0
    assert [r["format_reward"] for r in results] == [1.0] * len(responses)


def test_long_answers_match_only_an_identical_string():
    digits = "7" * (MAX_ANSWER_CHARS + 1)
    assert _settle(digits, digits, fast=True) is True
    assert _settle(digits, digits + "0", fast=True) is False
    assert _settle(digits + ".0", digits, fast=True) is False  # past the cap nothing is normalized
    start = time.monotonic()
    results = grade_batch([_r1("1" * 100_000)], ["1" * 100_000], workers=1, timeout_s=5.0)
    assert results[0]["reward"] == 1.0 and results[0]["settled_by"] == "fast"
    assert time.monotonic() - start < 5.0  # 27 s before the fix
