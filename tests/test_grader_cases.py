"""Grader: hand-labelled tables for relations, ordered pairs vs lists, list commas, several boxes, percent words,
list words, the fast stages' deferral, answer extraction, and exact decimals (MATH answers are exact).

Every pair is checked in both argument orders and with fast=False (math-verify re-checks each fast "not equal").
"""

import pytest

from utils.drgrpo_grader import (_settle, answer_candidates, grade, grade_batch, question_only_reward_fn,
                                  r1_zero_reward_fn)

# An equation matches the same equation rearranged or scaled; a bare value matches only `variable = value`.
RELATION_CASES = [
    ("0", "2x - y + 3z + 8 = 0", False),
    ("1", r"\frac{x^2}{4}+\frac{y^2}{9}=1", False),
    ("11a+c", "7 = 11a+c", False),
    ("7", "7 = 11a+c", False),
    ("x^2+y^2", "x^2+y^2=1", False),
    ("2x+4y-3=0", r"y=-\frac12x+\frac34", True),
    ("4y = 3 - 2x", r"y=-\frac{1}{2}x+\frac{3}{4}", True),
    ("2x+4y+3=0", r"y=-\frac12x+\frac34", False),  # parallel line
    (r"\frac{x^2}{4}+\frac{y^2}{9}=1", "9x^2+4y^2=36", True),
    (r"\frac{x^2}{4}+\frac{y^2}{9}=1", "4x^2+9y^2=36", False),  # axes swapped
    ("2x-y+3z+8=0", "-2x+y-3z-8=0", True),
    ("2x-y+3z+8=0", "2x-y+3z-8=0", False),
    ("7 = 11a+c", "11a+c = 7", True),
    ("7 = 11a+c", "22a+2c=14", True),
    ("7 = 11a+c", "11a+c = 8", False),
    ("y = 2x+3", "2x - y + 3 = 0", True),
    ("y = 2x+3", "2x - y - 3 = 0", False),
    ("x = 5", "5", True),
    ("5", "y = 5", True),
    ("x = 5", "6", False),
    ("x = 5", "y = 5", False),  # different relations: the whole relation must match
    (r"f(x) = x^2", "x^2", True),
    ("y = 0.5x", r"y = \frac{x}{2}", True),
]

# A tuple against a bare list or set is compared in the written order; lists among themselves are sets.
TUPLE_LIST_CASES = [
    ("(3,1)", "1,3", False),
    ("(1,3)", "3, 1", False),
    ("(1,3)", r"\{3,1\}", False),
    ("(1,3)", "1,3", True),
    ("(1,2,3)", "1, 2, 3", True),
    ("(1,2,3)", "3, 2, 1", False),
    (r"(\frac12, 3)", "0.5, 3", True),
    ("1,3", "3,1", True),
    ("(2, 2), (6, 2)", "(6,2),(2,2)", True),
    ("(2, 2), (6, 2)", "(2,6),(2,2)", False),
]

# A comma followed by a space separates list items; a comma between digit groups is a thousands separator.
LIST_COMMA_CASES = [
    ("32, 349", "32349", False),
    ("32,349", "32349", True),
    ("1, 000", "1000", False),
    ("1, 234, 567", "1234567", False),
    ("1,234,567", "1234567", True),
    ("12, 345", "12345", False),
    (r"12{,}345", "12345", True),
    ("32, 349", "349, 32", True),
    ("32, 349", "32, 348", False),
]

# `percent`, `percentage`, `pct`, `per cent` mean \%.
PERCENT_WORD_CASES = [
    ("28 percent", r"28\%", True),
    ("28 pct", r"28\%", True),
    ("28 percentage", r"28\%", True),
    (r"28 \text{ percent}", r"28\%", True),
    ("28 per cent", r"28\%", True),
    ("28 percent", "0.28", True),
    ("29 percent", r"28\%", False),
    ("2.8 percent", r"28\%", False),
    ("28 percentile", r"28\%", False),
    ("28 pct", "0.29", False),
]

# `and` / `or` (bare or in \text{}) between items separate a list.
LIST_WORD_CASES = [
    (r"19, 46, \text{ and } 82", "19, 46, and 82", True),
    ("19, 46, and 82", "82, 46, 19", True),
    ("19, 46 and 82", "19, 46, 82", True),
    (r"19 \text{ and } 46", "19, 46", True),
    ("3 or 4", "4, 3", True),
    ("19, 46, and 83", "19, 46, 82", False),
    ("1 and 2", "12", False),
    (r"x = 1 \text{ or } x = 3", "1, 2", False),
]

# Cases where a fast stage used to answer "not equal" while math-verify proves equality: the fast stages must
# either prove the answer or defer (the fast=False check below confirms every fast "not equal").
FAST_DEFERS_CASES = [
    ("(1,2),(3,4),(1,2)", "(3,4),(1,2)", True),
    ("1, 1, 2", "2, 1", True),
    (r"x=1 \text{ or } x=2", "1, 2", True),
    ("x = -1 or x = 4", "4, -1", True),
    (r"\begin{pmatrix}1\\2\\\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\begin{pmatrix}1 & 2\\3 & 4\\\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
    (r"\begin{pmatrix}1\\3\\\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", False),
    ("(1,2),(3,4)", "(1,2),(4,3)", False),
]

# MATH answers are exact: a decimal is the rational it spells; no tolerance (0.\overline{3} is exactly 1/3).
EXACT_DECIMAL_CASES = [
    ("1.0000001", "1", False),
    ("0.9999999", "1", False),
    ("2.000001", "2", False),
    ("0.0001", "0", False),
    ("99.99", "100", False),
    ("3.14159265", r"\pi", False),
    ("3.1415926535897932", r"\pi", False),
    ("6.2832", r"2\pi", False),
    (r"\frac{22}{7}", r"\pi", False),
    (r"\frac{355}{113}", r"\pi", False),
    ("0.3333333", r"\frac{1}{3}", False),
    ("0.6667", r"\frac23", False),
    ("0.666666666666", r"\frac{2}{3}", False),
    ("1.4142136", r"\sqrt{2}", False),
    ("1.41421356237", r"\sqrt2", False),
    ("0.7071", r"\frac{\sqrt{2}}{2}", False),
    ("1.7320508", r"\sqrt{3}", False),
    ("2.718281828", "e", False),
    (r"1.4999\pi", r"\frac{3\pi}{2}", False),
    ("-0.50001", r"-\frac12", False),
    ("0.12", r"\frac18", False),
    ("0.333", r"33\%", False),
    ("3.14", "3.141", False),
    ("1.51", "1.5", False),
    (r"0.\overline{3}", "0.3333", False),
    (r"0.\overline{3}", r"\frac{1}{3}", True),
    (r"0.1\overline{6}", r"\frac{1}{6}", True),
    (r"0.\overline{142857}", r"\frac{1}{7}", True),
    (r"1.\overline{3}", r"\frac{4}{3}", True),
    ("0.125", r"\frac18", True),
    ("-0.5", r"-\frac12", True),
    ("1.50", r"\frac{3}{2}", True),
    ("100.0", "100", True),
    ("3.14", "3.140", True),
    ("0.33", r"33\%", True),
    (r"0.5\sqrt{2}", r"\frac{\sqrt{2}}{2}", True),
    (r"1.5\pi", r"\frac{3\pi}{2}", True),
]

TABLES = {"relation": RELATION_CASES, "tuple_list": TUPLE_LIST_CASES, "list_comma": LIST_COMMA_CASES,
          "percent_word": PERCENT_WORD_CASES, "list_word": LIST_WORD_CASES, "fast_defers": FAST_DEFERS_CASES,
          "exact_decimal": EXACT_DECIMAL_CASES}
ALL_CASES = [case for table in TABLES.values() for case in table]


@pytest.mark.parametrize("answer, ground_truth, expected", ALL_CASES)
def test_grade_both_orders_and_modes(answer, ground_truth, expected):
    assert grade(answer, ground_truth) is expected
    assert grade(ground_truth, answer) is expected
    assert grade(answer, ground_truth, fast=False) is expected


@pytest.mark.parametrize("answer, ground_truth, expected", ALL_CASES)
def test_fast_stages_only_settle_what_they_prove(answer, ground_truth, expected):
    # A verdict of the fast stages is final in grade_batch's prepass; None sends the pair to math-verify.
    for a, b in ((answer, ground_truth), (ground_truth, answer)):
        assert _settle(a, b, fast=True) in (None, expected)


RELATION_GOLDS = ["2x - y + 3z + 8 = 0", r"\frac{x^2}{4}+\frac{y^2}{9}=1", "7 = 11a+c", "x^2 + y^2 = 25",
                  "3x + 2y = 12", r"y^2 = 4x", r"\sqrt{x} + 1 = 3", "a + b = 10", "2x = 6"]


@pytest.mark.parametrize("gold", RELATION_GOLDS)
def test_relation_gold_never_credits_a_bare_side(gold):
    left, right = (side.strip() for side in gold.split("="))
    for side in (left, right, f"\\boxed{{{right}}}", f"$ {right} $"):
        for fast in (True, False):
            assert not grade(side, gold, fast) and not grade(gold, side, fast)
        assert r1_zero_reward_fn(_r1(side), gold)["reward"] == 0.0
    results = grade_batch([_r1(left), _r1(right), _r1(gold)], [gold] * 3, workers=1, timeout_s=20.0)
    assert [r["reward"] for r in results] == [0.0, 0.0, 1.0]


def _r1(answer: str) -> str:
    return f"We compute it step by step. </think> <answer> {answer} </answer>"


# (text inside <answer>, ground truth, reward): boxes win (the last alone or all together as a list), else math
# spans the same way, else the whole text.
EXTRACTION_CASES = [
    ("Answer $ 9 $", "9", 1),
    (r"Answer \( 9 \)", "9", 1),
    (r"Answer \[ 9 \]", "9", 1),
    ("Answer $$9$$", "9", 1),
    (r"Therefore $x \geq 5$ is the solution.", r"x \ge 5", 1),
    ("We get $x = 3$, so $y = 9$.", "9", 1),
    ("We get $x = 3$, so $y = 9$.", "3", 0),
    (r"$\frac{1}{2}$ rounds to \boxed{0.4}", "0.5", 0),
    (r"$\frac{1}{2}$ rounds to \boxed{0.4}", "0.4", 1),
    ("Answer 9", "9", 0),
    ("9", "9", 1),
    (r"The cost is \$5", "5", 0),
    ("Answer $ 8 $", "9", 0),
    (r"$1$ and $2$", "1, 2", 1),
]

# Several boxes: graded together as a list and as the last box alone; credit if either matches.
MULTI_BOX_CASES = [
    (r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}", "(2, 2), (6, 2)", 1),
    (r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}", "(6, 2)", 1),
    (r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}", "(2, 2)", 0),
    (r"\boxed{1} and \boxed{2}", "2, 1", 1),
    (r"\boxed{x=1} or \boxed{x=-1}", "1, -1", 1),
    (r"\boxed{3} \boxed{4}", "3", 0),
    (r"\boxed{1}, \boxed{2}, \boxed{3}", "1, 2", 0),
    (r"\boxed{5} \boxed{}", "5", 0),  # the last box is empty
    (r"\boxed{4} then \boxed{5", "4", 0),  # the last box never closes
]


@pytest.mark.parametrize("answer, ground_truth, expected", EXTRACTION_CASES + MULTI_BOX_CASES)
def test_r1_zero_answer_extraction(answer, ground_truth, expected):
    reward = r1_zero_reward_fn(_r1(answer), ground_truth)
    assert (reward["format_reward"], reward["reward"]) == (1.0, float(expected))
    assert r1_zero_reward_fn(_r1(answer), ground_truth, fast=False)["reward"] == float(expected)


def test_grade_batch_reads_answers_like_r1_zero_reward_fn():
    cases = EXTRACTION_CASES + MULTI_BOX_CASES
    results = grade_batch([_r1(a) for a, _, _ in cases], [g for _, g, _ in cases], workers=1, timeout_s=20.0)
    assert [r["reward"] for r in results] == [float(e) for _, _, e in cases]


def test_answer_candidates_rule():
    assert answer_candidates(r" \boxed{1} and \boxed{2} ") == ["2", "1, 2"]
    assert answer_candidates(r"$3$ \boxed{4}") == ["4"]  # a box wins over math spans
    assert answer_candidates(r"so \( x = 2 \)") == ["x = 2"]
    assert answer_candidates(r"cost \$5 and \$6") == [r"cost \$5 and \$6"]  # escaped dollars open no span
    assert answer_candidates(r"$5") == ["$5"]  # an unclosed span is text
    assert answer_candidates(r"\boxed{}") == [""]
    # question_only responses are whole solutions: only their last box (or last number) is graded
    assert question_only_reward_fn(r"First \boxed{3}, then \boxed{4}", "3, 4")["reward"] == 0.0
