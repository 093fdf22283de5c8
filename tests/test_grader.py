"""Math grader: a hand-written table of MATH-style answers, r1_zero format rules, pathological inputs, and the pool."""

import os
import time

import pytest

from utils.drgrpo_grader import (_settle, fast_equivalent, grade, grade_batch, question_only_reward_fn,
                                  r1_zero_reward_fn)

# (model answer, ground truth, equivalent?) written from MATH-style answers, grouped by what they exercise.
EQUIVALENCE_CASES = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", True),
    (r"\frac{1}{2}", "1/2", True),
    (r"\dfrac12", r"\frac{1}{2}", True),
    (r"\tfrac{1}{2}", "0.5", True),
    ("0.5", "1/2", True),
    (r"\frac{2}{4}", r"\frac{1}{2}", True),
    (r"\frac{-3}{4}", r"-\frac{3}{4}", True),
    (r"-\frac{3}{4}", "-0.75", True),
    (r"\frac{3}{-4}", "-0.75", True),
    (".5", "0.5", True),
    ("2.50", "2.5", True),
    ("5.0", "5", True),
    ("5.00", "5", True),
    (r"\frac{7}{3}", r"2\frac{1}{3}", True),  # MATH writes mixed numbers; math-verify reads them so
    (r"\frac{10}{4}", "2.5", True),
    (r"\frac{1}{3}", "0.333", False),
    (r"\frac{1}{3}", "0.3333", False),
    (r"\frac{1}{3}", "0.33333333", False),  # MATH answers are exact: a decimal is the rational it spells
    (r"\frac{2}{3}", "0.667", False),
    ("1/2", "2", False),
    (r"\frac{1}{2}", r"\frac{2}{1}", False),
    (r"\frac{3}{4}", r"\frac{4}{3}", False),
    ("0.25", r"\frac{1}{4}", True),
    ("0.2", r"\frac{1}{4}", False),
    (r"\frac{12}{5}", "2.4", True),
    (r"\frac{1}{7}", r"\frac{1}{8}", False),
    (r"\frac{100}{3}", "33.3", False),
    (r"\frac{9}{8}", "1.125", True),
    # integers, signs, thousands separators, assignments
    ("12", "21", False),
    ("-5", "-5", True),
    ("-5", "5", False),
    ("\u22125", "-5", True),  # unicode minus
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    (r"1\,000", "1000", True),
    ("10,000", "10000", True),
    ("1,000,000", "1000000", True),
    ("1,000", "100", False),
    ("x = 5", "5", True),
    ("x=5", "5", True),
    ("y = -3", "-3", True),
    (r"\theta = 30", "30", True),
    ("k = 4", "5", False),
    ("f(x) = 2x+1", "2x+1", True),
    ("0", "0", True),
    ("0", "-0", True),
    ("007", "7", True),
    ("100", "1000", False),
    ("2", "2.0001", False),
    ("5.", "5", True),
    ("+5", "5", True),
    # percent, degrees, dollars, units
    (r"50\%", "50", True),
    (r"50\%", "0.5", True),
    ("50%", "50", True),
    (r"50\%", "5", False),
    (r"12.5\%", r"\frac{1}{8}", True),
    ("10^\\circ", "10", True),
    ("10^{\\circ}", "10", True),
    ("10\u00b0", "10", True),
    (r"30^\circ", "60", False),
    (r"\$5", "5", True),
    (r"\$5.00", "5", True),
    (r"\$1,250", "1250", True),
    (r"\$5", "6", False),
    (r"5\text{ cm}", "5", True),
    (r"12 \text{ inches}", "12", True),
    (r"6\text{ cm}^2", "6", True),
    ("20 feet", "20", True),
    (r"4\text{ units}", "5", False),
    (r"3 \mbox{ meters}", "3", True),
    # radicals and pi
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    (r"\sqrt{8}", r"2\sqrt{2}", True),
    (r"\sqrt{12}", r"2\sqrt3", True),
    (r"3\sqrt{2}", r"\sqrt{18}", True),
    (r"\sqrt{3}", "3", False),
    (r"\sqrt{3}", r"\sqrt{2}", False),
    (r"2\sqrt{3}", r"3\sqrt{2}", False),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", True),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac{\sqrt5+1}{2}", True),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac{1-\sqrt{5}}{2}", False),
    (r"\sqrt[3]{8}", "2", True),
    (r"\sqrt[3]{16}", r"2\sqrt[3]{2}", True),
    (r"\sqrt{4}", "2", True),
    (r"2\pi", r"2 \pi", True),
    (r"2\pi", r"\pi \cdot 2", True),
    (r"\frac{\pi}{2}", r"\frac12\pi", True),
    (r"\frac{3\pi}{4}", r"\frac{3}{4}\pi", True),
    (r"2\pi", r"\pi", False),
    (r"4\pi", "4", False),
    (r"\pi r^2", r"r^2\pi", True),
    ("3.14159265", r"\pi", False),
    ("3.14", r"\pi", False),
    (r"\pi^2", r"\pi \cdot \pi", True),
    (r"100\pi", r"10\pi", False),
    # powers, factorials
    ("2^{10}", "1024", True),
    ("2^10", "1024", True),  # TeX would print 2^1 0, but models mean 2^{10}, and math-verify reads it so
    ("2^{2007}", "2^{2007}", True),
    ("2^{2007}", "2^{2008}", False),
    ("5!", "120", True),
    ("6!", "120", False),
    ("3^4", "81", True),
    ("2^{100}", "1267650600228229401496703205376", True),
    (r"\binom{2004}{2}", "2007006", True),  # the guard lets realistic sizes through to sympy
    ("(x+1)^{3}", "x^3+3x^2+3x+1", True),
    ("(x+1)^{20}", "(1+x)^{20}", True),
    ("2^{-1}", "0.5", True),
    # infinity and intervals
    (r"\infty", r"\infty", True),
    (r"-\infty", r"\infty", False),
    ("\u221e", r"\infty", True),
    ("[1,2)", "[1,2)", True),
    ("[1, 2)", r"\left[1,2\right)", True),
    ("[1,2)", "[1,2]", False),
    ("[1,2)", "(1,2)", False),
    ("(1,2]", "[1,2]", False),
    (r"(-\infty, 3)", r"(-\infty,3)", True),
    (r"(-\infty, 3)", r"(-\infty, 3]", False),
    (r"[0, \infty)", r"[0,\infty)", True),
    (r"(-\infty, -2) \cup (3, \infty)", r"(-\infty,-2)\cup(3,\infty)", True),
    (r"(-\infty, -2) \cup (3, \infty)", r"(-\infty,-2]\cup[3,\infty)", False),
    (r"x \in [1,2]", "[1,2]", True),
    (r"[\frac{1}{2}, 3]", "[0.5, 3]", True),
    ("1 < x < 2", "(1,2)", True),
    (r"x > 3", r"(3, \infty)", True),
    (r"x \le 2", r"(-\infty, 2]", True),
    (r"x \le 2", r"(-\infty, 2)", False),
    # tuples, points, sets, lists
    ("(1, 2)", "(1,2)", True),
    ("(1,2)", "(2,1)", False),
    (r"\left( 1, 2 \right)", "(1,2)", True),
    ("(1,2,3)", "(1,2)", False),
    (r"(\frac{1}{2}, -3)", "(0.5, -3)", True),
    (r"(2, \sqrt{3})", r"(2, \sqrt{3})", True),
    (r"(3, -1)", r"(3, 1)", False),
    (r"\{1,2\}", r"\{2,1\}", True),
    (r"\{1,2,3\}", r"\{3,1,2\}", True),
    (r"\{1,2\}", r"\{1,3\}", False),
    (r"\{1,2\}", "1, 2", True),
    ("2, 3", "3, 2", True),
    ("-1, 4", "4, -1", True),
    ("1, 2", "1, 3", False),
    ("1, 2, 3", "1, 2", False),
    (r"1 \text{ and } 2", "1, 2", True),
    # matrices and vectors
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{bmatrix}1\\2\end{bmatrix}", True),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}", False),
    (r"\begin{pmatrix}1 & 2\\3 & 4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
    (r"\begin{pmatrix}1 & 2\\3 & 4\end{pmatrix}", r"\begin{pmatrix}1&3\\2&4\end{pmatrix}", False),
    (r"\begin{pmatrix}\frac12\\-1\end{pmatrix}", r"\begin{pmatrix}0.5\\-1\end{pmatrix}", True),
    (r"\begin{pmatrix}1\\2\\3\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", False),
    # multiple choice and word answers
    (r"\text{(B)}", "B", True),
    (r"\text{(B)}", "(B)", True),
    (r"\textbf{(B)}", r"\text{(B)}", True),
    ("b", "B", True),
    (r"\text{(B)}", "C", False),
    (r"\text{Monday}", "Monday", True),
    (r"\text{Monday}", "monday", True),
    (r"\text{Monday}", r"\text{Tuesday}", False),
    (r"\emph{odd}", r"\text{odd}", True),
    (r"\text{even}", r"\text{odd}", False),
    ("no", "on", False),
    ("yes", r"\text{yes}", True),
    (r"\text{Devon}", "Devon", True),
    # algebraic expressions
    ("x^2+2x+1", "(x+1)^2", True),
    ("2x+3", "3+2x", True),
    ("y = 2x+3", "2x+3", True),
    ("2x+3", "2x-3", False),
    (r"\frac{x}{2}", "0.5x", True),
    (r"\frac{x^2-1}{x-1}", "x+1", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("x^2+1", "x^2-1", False),
    ("a+b", "b+a", True),
    ("3a", "3b", False),
    (r"\frac{a}{b}", r"\frac{b}{a}", False),
    (r"\sqrt{x}", r"x^{\frac{1}{2}}", True),
    ("xy", "x+y", False),
    (r"\sqrt{x^2}", "x", False),
    (r"6x^2 - 5x - 6", r"(2x-3)(3x+2)", True),
    (r"\alpha + 1", r"1 + \alpha", True),
    # only math-verify/sympy can read these
    (r"\log_2 8", "3", True),
    (r"\log_2 8", "4", False),
    (r"e^{2}", "e^2", True),
    (r"e^{2}", "e^3", False),
    ("3+4i", "4i+3", True),
    ("3+4i", "3-4i", False),
    (r"\sin^2 x + \cos^2 x", "1", True),
    (r"\binom{5}{2}", "10", True),
    (r"\sin 30", r"\cos 30", False),
    # empty and malformed
    ("", "", False),
    ("", "5", False),
    ("   ", "5", False),
    (r"\frac{1}{2", "1/2", False),
    ("5}", "5", False),
]


@pytest.mark.parametrize("answer, ground_truth, expected", EQUIVALENCE_CASES)
def test_grade_table(answer, ground_truth, expected):
    assert grade(answer, ground_truth) is expected


@pytest.mark.parametrize("answer, ground_truth, expected", EQUIVALENCE_CASES)
def test_grade_is_symmetric(answer, ground_truth, expected):
    assert grade(ground_truth, answer) is grade(answer, ground_truth)


@pytest.mark.parametrize("answer, ground_truth, expected", EQUIVALENCE_CASES)
def test_symbolic_stage_confirms_fast_negatives(answer, ground_truth, expected):
    # fast=False re-checks every "not equal" of the fast stages with math-verify/sympy: the two must agree.
    assert grade(answer, ground_truth, fast=False) is expected


TYPICAL_MATH_PAIRS = [("42", "42"), ("42", "24"), (r"\frac{3}{4}", "0.75"), (r"\frac{3}{4}", r"\frac{4}{3}"),
                      (r"2\sqrt{3}", r"\sqrt{12}"), (r"2\sqrt{3}", r"3\sqrt{2}"), (r"4\pi", r"4 \pi"),
                      ("(1, 2)", "(2, 1)"), ("[1,2)", "[1,2]"), (r"\text{(C)}", "(D)"), ("x^2+1", "1+x^2"),
                      (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}"), ("1,000", "999")]


@pytest.mark.parametrize("answer, ground_truth", TYPICAL_MATH_PAIRS)
def test_typical_answers_are_settled_without_sympy(answer, ground_truth):
    # grade_batch's speed rests on this: these never reach a worker process.
    assert _settle(answer, ground_truth, fast=True) is not None


@pytest.mark.parametrize("answer, ground_truth, expected", EQUIVALENCE_CASES)
def test_fast_equivalent_never_claims_more_than_grade_and_never_calls_sympy(answer, ground_truth, expected,
                                                                           monkeypatch):
    import utils.drgrpo_grader as G

    monkeypatch.setattr(G, "symbolic_equal", lambda a, b: pytest.fail("fast_equivalent reached sympy"))
    verdict = fast_equivalent(answer, ground_truth)
    assert verdict is False or expected is True  # a True is always a true equivalence
    if (answer, ground_truth) in TYPICAL_MATH_PAIRS:
        assert verdict is expected


def test_fast_equivalent_joins_numeric_forms():
    assert fast_equivalent("0.5", r"\frac{1}{2}") and fast_equivalent("3.0", r"\dfrac{6}{2}")
    assert fast_equivalent("1,000", "1000") and fast_equivalent(r"\frac{3}{4}", "0.75")
    assert not fast_equivalent("2", "3") and not fast_equivalent("x", "")


def _r1(answer: str) -> str:
    return f"Add the parts: 3 + 2 = 5. </think> <answer> {answer} </answer>"


# (response, ground truth, (format_reward, answer_reward, reward))
R1_ZERO_CASES = [
    (_r1("5"), "5", (1, 1, 1)),
    (_r1("6"), "5", (1, 0, 0)),
    (_r1(r"\boxed{5}"), "5", (1, 1, 1)),
    (_r1(r"The answer is \boxed{\dfrac12}."), "0.5", (1, 1, 1)),
    (_r1(r"\boxed{4} then \boxed{5}"), "5", (1, 1, 1)),
    (_r1(r"\boxed{}"), "5", (1, 0, 0)),
    (_r1(r"\boxed{5"), "5", (1, 0, 0)),
    (_r1(""), "5", (1, 0, 0)),
    (_r1("5"), ["4", "5"], (1, 1, 1)),
    (_r1("5"), ["4", "6"], (1, 0, 0)),
    (_r1(r"\frac{1}{2}"), ["0.5", r"\text{half}"], (1, 1, 1)),
    ("reasoning </think><answer> 5 </answer>", "5", (0, 0, 0)),  # no space between the tags
    ("reasoning </think>  <answer> 5 </answer>", "5", (0, 0, 0)),
    ("reasoning </think> <answer> 5", "5", (0, 0, 0)),  # no closing tag
    ("reasoning <answer> 5 </answer>", "5", (0, 0, 0)),  # no </think>
    ("", "5", (0, 0, 0)),
    ("reasoning </think> <answer> 4 </answer> <answer> 5 </answer>", "5", (1, 1, 1)),  # the last block counts
    ("reasoning </think> <answer> 5 </answer> <answer> 4 </answer>", "5", (1, 0, 0)),
    ("reasoning </think> <answer>5</answer>", "5", (1, 1, 1)),
    ("reasoning </think> <answer> x = 5 </answer>", "5", (1, 1, 1)),
    ("reasoning </think> <answer> 1,000 </answer>", "1000", (1, 1, 1)),
    ("reasoning </think> <answer> 4 </answer> 5", "5", (1, 0, 0)),  # text after </answer> stays: "4 5" is no 5
]


@pytest.mark.parametrize("response, ground_truth, expected", R1_ZERO_CASES)
def test_r1_zero_reward_fn(response, ground_truth, expected):
    reward = r1_zero_reward_fn(response, ground_truth)
    assert (reward["format_reward"], reward["answer_reward"], reward["reward"]) == expected
    assert all(type(v) is float for v in reward.values())


QUESTION_ONLY_CASES = [
    (r"So the answer is $\boxed{12}$.", "12", (1, 1, 1)),
    (r"First \boxed{3}, corrected: \boxed{4}", "4", (1, 1, 1)),
    ("The total is 12.", "12", (0, 1, 1)),
    ("We get 7 apples, then 3 more, so 10", "10", (0, 1, 1)),
    ("It costs 1,000 dollars", "1000", (0, 1, 1)),
    ("The value is -5", "-5", (0, 1, 1)),
    ("The ratio is 3/4", r"\frac{3}{4}", (0, 1, 1)),
    ("no number at all", "5", (0, 0, 0)),
    (r"\boxed{5}", "6", (1, 0, 0)),
    ("12 is wrong, it is 13", ["12", "14"], (0, 0, 0)),
]


@pytest.mark.parametrize("response, ground_truth, expected", QUESTION_ONLY_CASES)
def test_question_only_reward_fn(response, ground_truth, expected):
    reward = question_only_reward_fn(response, ground_truth)
    assert (reward["format_reward"], reward["answer_reward"], reward["reward"]) == expected


def _nested_frac(chars: int) -> str:
    text = "1"
    while len(text) < chars:
        text = r"\frac{1}{" + text + "}"
    return text


PATHOLOGICAL = [r"9^{9^{9^{9}}}", r"10^{10^{10}}!", _nested_frac(20_000), r"\frac{1}{2", "{{{{{", "}}}(", "",
                "\u2135\u2202\u2206\u2248\ufffd\x00", r"(10^{100})^{10^{100}}", r"99999!", "9" * 5000,
                r"\sqrt{" * 500, r"2^{2^{2^{2^{2^{2}}}}}", "9^9^9", "2^2^2^2^2^2", r"10^{9}!", "10!!", r"(10^9)!",
                r"(x+1)^{10000}", r"\binom{10^{9}}{10^{8}}", r"\frac{10^{9}!}{2}", r"x^{10^{9}}",
                # the same with the exponent in parentheses
                "9^(9^(9^9))", "(x+1)^(10000)", "10^(9)!", "x^(10^(9))", "2^(2^(2^(2^(2^2))))"]


@pytest.mark.parametrize("answer, ground_truth, expected", [
    ("2^(x+1)", "2^(1+x)", True), ("2^(x+1)", r"2\cdot 2^x", True), ("2^(x+1)", "2^{x+1}", True),
    ("2^(x+1)", "2^x+1", False), ("x^(2)+2x+1", "(x+1)^2", True), ("2^(10)", "1024", True),
    ("x^(1/2)", r"\sqrt{x}", True), ("(1/2)^(2)", r"\frac14", True),
])  # fmt: skip
def test_exponents_in_parentheses_are_graded_like_braced_ones(answer, ground_truth, expected):
    """`2^(x+1)`: the guard reads a parenthesized exponent as one operand (it used to read `(` alone, found it
    malformed and refused the answer: graded wrong without being parsed)."""
    assert grade(answer, ground_truth) is expected
    assert grade(ground_truth, answer) is expected


@pytest.mark.parametrize("answer", PATHOLOGICAL, ids=lambda a: repr(a[:20]))
def test_pathological_answers_are_wrong_and_fast(answer):
    # The guard decides these in pure Python, before any sympy call that could run away (checked first, so a
    # broken guard fails here instead of hanging below).
    assert _settle(answer, "1", fast=True) is False
    assert _settle(answer, "1", fast=False) is False
    start = time.monotonic()
    assert grade(answer, "1") is False
    assert grade(answer, "1", fast=False) is False
    assert r1_zero_reward_fn(_r1(answer), "1")["reward"] == 0.0
    assert time.monotonic() - start < 30  # generous: each takes milliseconds when the guard works


def _hanging_reward_fn(response, ground_truth):
    """r1_zero, except that a response "HANG" never returns (stands in for a sympy call that runs away)."""
    if response == "HANG":
        time.sleep(30)  # far past the test's timeout_s; short enough that a broken pool fails instead of hanging
    if response == "CRASH":
        os._exit(3)
    return r1_zero_reward_fn(response, ground_truth)


def _failing_reward_fn(response, ground_truth):
    raise KeyError("bug")


def test_grade_batch_equals_per_item_grading():
    responses = [_r1(a) for a, _, _ in EQUIVALENCE_CASES] + [r for r, _, _ in R1_ZERO_CASES]
    ground_truths = [g for _, g, _ in EQUIVALENCE_CASES] + [g for _, g, _ in R1_ZERO_CASES]
    results = grade_batch(responses, ground_truths, workers=2, timeout_s=20.0)
    keys = ("format_reward", "answer_reward", "reward")
    per_item = [r1_zero_reward_fn(r, g) for r, g in zip(responses, ground_truths)]
    assert [{k: r[k] for k in keys} for r in results] == per_item
    assert not any(r["timed_out"] for r in results)
    settled_by = {r["settled_by"] for r in results}
    assert settled_by == {"fast", "worker"}  # both paths ran

    questions = [r for r, _, _ in QUESTION_ONLY_CASES]
    answers = [g for _, g, _ in QUESTION_ONLY_CASES]
    results = grade_batch(questions, answers, workers=1, reward_fn=question_only_reward_fn)
    assert [r["reward"] for r in results] == [float(e[2]) for _, _, e in QUESTION_ONLY_CASES]


def test_grade_batch_times_out_hung_items_and_recovers():
    responses = ["HANG", _r1("5"), "CRASH", _r1(r"\log_2 8"), "HANG", _r1("4")]
    ground_truths = ["5", "5", "5", "3", "5", "5"]
    start = time.monotonic()
    results = grade_batch(responses, ground_truths, workers=1, timeout_s=2.0, reward_fn=_hanging_reward_fn)
    assert time.monotonic() - start < 60
    assert [r["timed_out"] for r in results] == [True, False, False, False, True, False]
    assert [r["settled_by"] for r in results] == ["timeout", "worker", "crashed", "worker", "timeout", "worker"]
    assert [r["reward"] for r in results] == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_grade_batch_pathological_inputs_then_normal_items():
    responses = [_r1(a) for a in PATHOLOGICAL] + [_r1(r"\log_2 8"), _r1("7"), _r1(r"\frac{6}{2}")]
    ground_truths = ["1"] * len(PATHOLOGICAL) + ["3", "7", "3"]
    results = grade_batch(responses, ground_truths, workers=2, timeout_s=5.0)
    assert [r["reward"] for r in results] == [0.0] * len(PATHOLOGICAL) + [1.0, 1.0, 1.0]
    assert [r["settled_by"] for r in results[: len(PATHOLOGICAL)]] == ["fast"] * len(PATHOLOGICAL)
    assert [r["format_reward"] for r in results] == [1.0] * len(responses)


def test_grade_batch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        grade_batch([_r1("5")], ["5"], workers=0)
    with pytest.raises(ValueError, match="ground truths"):
        grade_batch([_r1("5")], ["5", "6"])
    with pytest.raises(RuntimeError, match="KeyError"):
        grade_batch([_r1("5")], ["5"], workers=1, reward_fn=_failing_reward_fn)
