"""Math answer grading for reasoning SFT: r1_zero / question-only rewards and a batch grader that never hangs.

    from utils.drgrpo_grader import r1_zero_reward_fn, grade, grade_batch
    r1_zero_reward_fn("... </think> <answer> \\boxed{\\dfrac12} </answer>", "0.5")   # 1/1/1
    grade_batch(responses, ground_truths, workers=2, timeout_s=5.0)                # list of reward dicts

`grade(a, b)` decides equivalence in three stages, cheapest first; a stage settles only what it can prove:
  1. String: both sides are normalized (`\\left`/`\\right`, spacing, `\\dfrac`, units, degrees, `\\%` and the words
     percent/pct, `\\$`, thousands commas (not `, `: that separates items), `and`/`or` between items, trailing `.0`,
     repeating decimals) and compared. Equations: see the table. Answers over MAX_ANSWER_CHARS match only an
     identical string.
  2. Exact values (`utils/exact_math.py`; answer shapes in `utils/answer_shapes.py`): Fractions (floats once
     `\\sqrt` or `\\pi` appear) for numbers, `\\frac`, `\\sqrt`, `\\pi`, powers, factorials and variables (at fixed
     rational points), in tuples, intervals, sets, lists.
  3. Symbolic (`utils/grader_pool.py`): math-verify in both roles, decimals passed as exact fractions, after a
     guard that refuses inputs sympy could spend unbounded work on. Conventions taken from math-verify:
     `2\\frac{1}{3}` is a mixed number, `2^10` means 2^{10}, a trailing unit word is dropped (`5 apples` = 5).

No numeric tolerance: a decimal is the rational it spells (`1.0000001` != 1, `3.14159265` != `\\pi`,
`0.3333333` != `\\frac13`, `0.\\overline{3}` = `\\frac13`). A decimal ground truth is an approximation only in
that the question asked for that rounding, so the answer must spell the same value (`3.10` = `3.1` != `3.14`):
grading is symmetric and cannot tell which side is the reference, so there is no tolerance to give either side.

Where this grader knowingly differs from the published Dr. GRPO grader (understand-r1-zero: PRM800K-style
normalization and sympy, math-verify when fast=False), as measured with its r1_zero_reward_fn at fast=True (with
fast=False, math-verify also credited every example below that the published column calls wrong):
| answers                                   | published                 | here                 | why                 |
|-------------------------------------------|---------------------------|----------------------|---------------------|
| `11a+c` for gold `7 = 11a+c`              | credited (short left cut) | wrong                | a side != relation  |
| `2x+4y-3=0`, `y=-\\frac12x+\\frac34`      | wrong                     | equal (rearranged)   | the same line       |
| `x = 5` vs `y = 5`                        | equal (both cut to 5)     | wrong                | whole relation      |
| several `\\boxed{}`                       | last box only             | last, or all (list)  | one box per root    |
| `Answer $ 9 $` inside `<answer>`          | whole text graded         | last math span       | one extraction rule |
| `2, 3` vs `3, 2`; `\\{2,1\\}` vs `1, 2`   | wrong (items in order)    | equal (sets)         | find-all answers    |
| `(3,1)` vs `1,3`                          | wrong; `(1,3)` wrong      | wrong; `(1,3)` equal | a tuple is ordered  |
| `\\frac{2}{4}`, `\\frac12`; `\\frac62`, 3 | wrong (reduced/int form)  | equal                | the value counts    |
| `0.3333333`, `\\frac13` (fast=False)      | credited (6-digit round)  | wrong                | MATH is exact       |
| `50\\%` vs `0.5`; `28 percent` vs `0.28`  | wrong                     | equal                | same quantity       |
| 3+ variables, `2^10`                      | sympy refuses: strings    | evaluated            | planes, polynomials |
| `2^{x+1}` vs `2\\cdot2^x`; vs `2^x+1`     | as `2^x+1`: wrong; equal  | equal; wrong         | TeX braces group    |
| 100,000 digits, `((((x+1)^9)^9)^9)^9`     | no time limit: 3 s, 58 s  | capped, killed       | a batch must end    |

`grade_batch` runs stages 1-2 in the calling process and sends only unsettled items to worker processes that it
kills and replaces when an item exceeds `timeout_s` (concurrent.futures cannot stop a running task, and SIGALRM
cannot interrupt a long big-integer operation inside C). Every regex before that runs in linear time, so each
item returns within timeout_s plus milliseconds. Speed (play-scripts/bench-scripts/bench_grader.py, 5,000 seeded
MATH-style responses, 2 workers): 98.2% settled in-process in 0.53 s of CPU, the other 92 take 4.0 s of CPU in
workers; wall time 2.2 s on an idle 2-core container (2026-11-26), 9-40 s at load average 5-7 (2026-11-29).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable

from utils.answer_shapes import align_tuple, braced_list, compare_text, fast_compare, split_top
from utils.exact_math import compare_relations
from utils.grader_pool import (MAX_BRACE_DEPTH, MAX_SYMBOLIC_CHARS, brace_depth, refuse_symbolic, relations_equal,
                               run_batch, symbolic_equal)

MAX_ANSWER_CHARS = 5000  # longer answers match only an identical string: MATH answers are ~200 characters, and
# normalizing 100,000 characters of digits must not take longer than the timeout it runs before

# ---------------------------------------------------------------------------------------------------------------
# Answer extraction


def _boxes(text: str) -> list[str | None]:
    """Contents of the top-level `\\boxed{...}` (or `\\boxed x`) in text, in order; None for one whose brace never
    closes (it runs to the end of the text, so it is the last). One pass: each box is scanned once."""
    found: list[str | None] = []
    start = text.find("\\boxed")
    while start >= 0:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text):
            found.append(None)
            break
        if text[i] != "{":  # `\boxed 5`: TeX takes one token; models write it for short answers
            match = re.match(r"[^\s$]+", text[i : i + MAX_ANSWER_CHARS])
            found.append(match.group(0) if match and start + len("\\boxed") < i else None)
            start = text.find("\\boxed", i)
            continue
        depth, end = 0, None
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    end = j
                    break
        if end is None:
            found.append(None)
            break
        found.append(text[i + 1 : end])
        start = text.find("\\boxed", end)
    return found


def _last_boxed(text: str) -> str | None:
    """Content of the last top-level `\\boxed{}` in text; None when absent or its brace never closes."""
    boxes = _boxes(text)
    return boxes[-1] if boxes else None


_DELIMITER = re.compile(r"\\\$|\$\$|\$|\\[()\[\]]")
_CLOSER = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}


def _math_spans(text: str) -> list[str]:
    """Non-empty contents of `$...$`, `$$...$$`, `\\(...\\)` and `\\[...\\]` in text, in order (`\\$` is a dollar
    sign); an unclosed opener is not a span. One pass over the delimiters."""
    spans, opener, start = [], None, 0
    for match in _DELIMITER.finditer(text):
        delimiter = match.group(0)
        if opener is None and delimiter in _CLOSER:
            opener, start = delimiter, match.end()
        elif opener is not None and delimiter == _CLOSER[opener]:
            spans.append(text[start : match.start()].strip())
            opener = None
    return [span for span in spans if span]


def answer_candidates(answer_text: str) -> list[str]:
    """The answers to grade in an `<answer>` block, by one rule for every delimiter (first that applies):

    1. boxes: the last `\\boxed{}` alone and, when there are several, all boxes together as a list
       (`\\boxed{(2, 2)}` and `\\boxed{(6, 2)}` -> `(6, 2)` and `(2, 2), (6, 2)`); [''] when the last box is empty
       or never closes;
    2. else math spans: the same with `$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]` (`Answer $ 9 $` -> `9`);
    3. else the whole text, stripped.
    A response earns credit when any candidate matches.
    """
    parts = _boxes(answer_text) if "\\boxed" in answer_text else _math_spans(answer_text)
    if not parts:
        return [answer_text.strip()]
    if parts[-1] is None or not parts[-1].strip():
        return [""]
    parts = [p.strip() for p in parts if p and p.strip()]
    return parts[-1:] + ([", ".join(parts)] if len(parts) > 1 else [])


def extract_r1_zero_answers(response: str) -> tuple[bool, list[str]]:
    """(format ok, answer candidates) under the r1_zero contract: the text after the last `<answer>`, with
    `</answer>` removed, read by `answer_candidates`; the first candidate is the last box or span."""
    if "</think> <answer>" not in response or "</answer>" not in response:
        return False, [""]
    return True, answer_candidates(response.split("<answer>")[-1].replace("</answer>", ""))


def extract_r1_zero_answer(response: str) -> tuple[bool, str]:
    """(format ok, answer text): the first of `extract_r1_zero_answers` (the last box or math span, else the text);
    '' when a `\\boxed` is empty or unclosed."""
    format_ok, candidates = extract_r1_zero_answers(response)
    return format_ok, candidates[0]


_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _question_only_answer(response: str) -> tuple[bool, str]:
    """(found a \\boxed, answer text): the last `\\boxed{}` content, else the last number in the response."""
    boxed = _last_boxed(response)
    if boxed is not None:
        return True, boxed.strip()
    numbers = _LAST_NUMBER.findall(response)
    return False, numbers[-1] if numbers else ""


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: normalization

_UNICODE = {"\u2212": "-", "\u2013": "-", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u00b0": "", "\u00d7": "\\times ",
            "\u00f7": "\\div ", "\u221a": "\\sqrt", "\u2264": "\\le ", "\u2265": "\\ge ", "\u00a0": " ", "\u2009": " "}
_UNIT_WORDS = (r"(?:square|sq\.?|cubic)?\s*(?:units?|cm|centimeters?|meters?|mm|km|kilometers?|inches|inch|feet|foot|"
               r"ft|yards?|miles?|mph|degrees?|cents?|dollars?|hours?|minutes?|seconds?|days?|weeks?|years?|pounds?)")
_TEXT_UNITS = re.compile(r"(?<=[\d}])\s*\\(?:text|textrm|mbox|mathrm)\{\s*" + _UNIT_WORDS + r"\s*\}(?:\^\{?\d\}?)?\s*$")
_BARE_UNITS = re.compile(r"(?<=\d)\s+" + _UNIT_WORDS + r"(?:\^\{?\d\}?)?\s*$")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|emph)\{([^{}]*)\}")
_ASSIGNED = re.compile(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?")  # x, \theta, a_1, f(x)
_MEMBERSHIP = re.compile(_ASSIGNED.pattern + r"\\in(?![a-zA-Z])")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PERCENT_WORD = re.compile(r"(?<=[\d}]) ?(?:\\(?:text|mbox|mathrm)\{ ?)?(?:percent(?:age)?|per ?cent|pct)"
                           r"(?![a-zA-Z])\.?(?: ?\})?")
# `1 \text{ and } 2`, `19, 46, and 82`, `x=1 or x=2`: list separators (a bare word only between list items)
_LIST_WORD = re.compile(r",? ?(?:\\text\{ ?(?:and|or) ?\}|(?<=[\d)\]}, ])(?:and|or)(?![a-zA-Z])"
                        r"(?= ?[-\d(\[\\{a-zA-Z])) ?")
_REPEATING = re.compile(r"(?<![\d.])(\d*)\.(\d*)\\(?:overline|bar) ?\{?(\d+)\}?")  # 0.\overline{3}, 0.1\bar{6}


def _strip_decimal_zeros(match: re.Match) -> str:
    number = match.group(0).rstrip("0")
    return number[:-1] if number.endswith(".") else number


def _repeating_decimal(match: re.Match) -> str:
    """`0.1\\overline{6}` -> `\\frac{15}{90}`: the exact value of a repeating decimal."""
    whole, head, cycle = match.group(1) or "0", match.group(2), match.group(3)
    value = int(whole) + Fraction(int(head + cycle) - int(head or "0"), 10 ** len(head) * (10 ** len(cycle) - 1))
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _normalize(answer: str) -> tuple[str, bool]:
    """Canonical string form of an answer and whether it carried a percent sign.

    Removes only notation that never changes the value in MATH answers; the percent sign is returned separately
    because `50\\%` must equal both `50` (the issue's convention) and `0.5`. Relations are kept (`x=5` stays).
    Every pattern runs in linear time on runs of one space (the input is capped at MAX_ANSWER_CHARS).
    """
    s = re.sub(r"\s+", " ", answer).strip()
    if "\\boxed" in s:
        s = _last_boxed(s) or ""
    for char, replacement in _UNICODE.items():
        s = s.replace(char, replacement)
    s = s.replace("\\$", "").replace("$", "")
    list_commas = re.search(r", ", s) is not None  # `32, 349` is a list of two numbers, `32,349` one number
    s = _PERCENT_WORD.sub("\\\\%", s)
    s = re.sub(r"\\(?:left|right)\.", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", "\\\\frac", s).replace("\\dbinom", "\\binom").replace("bmatrix", "pmatrix")
    s = re.sub(r"\\\\ ?\\end\{pmatrix\}", "\\\\end{pmatrix}", s)  # a trailing row break adds no row
    s = re.sub(r"(?<!\\)\\(?:[!,;: ]|q?quad(?![a-zA-Z]))|~", " ", s)  # not the `\\ ` of a matrix row break
    s = re.sub(r"\^ ?\{ ?\\circ ?\}|\^ ?\\circ|\\circ|\\degree", "", s)
    percent = "%" in s
    s = s.replace("\\%", "").replace("%", "")
    s = _TEXT_UNITS.sub("", s)
    s = _BARE_UNITS.sub("", s)
    s = _LIST_WORD.sub(",", s)
    for _ in range(3):  # nested \text{\textbf{...}}
        s = _TEXT_CMD.sub(r"\1", s)
    # Spaces carry no meaning except between a command and a following letter (`\pi r`): keep exactly those.
    s = re.sub(r"(\\[a-zA-Z]+) (?=[a-zA-Z])", "\\1\x01", s)
    s = s.replace(" ", "").replace("\x01", " ")
    s = s.rstrip(".")  # sentence-final period
    if "=" not in s and len(re.findall(r"\\in(?![a-zA-Z])", s)) == 1:
        s = _MEMBERSHIP.sub("", s, count=1) if _MEMBERSHIP.match(s) else s
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)  # x^{2} -> x^2
    s = s.replace("{,}", "")
    if not list_commas and _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = _REPEATING.sub(_repeating_decimal, s)
    s = re.sub(r"(?<![\d.])\.(?=\d)", "0.", s)
    s = re.sub(r"(?<![\d.])\d+\.\d+", _strip_decimal_zeros, s)  # the lookbehind keeps long digit runs linear
    s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # multiple choice: (B) -> B
    if s.isalpha() and s.isascii():
        s = s.lower()
    parts = split_top(s) if "=" in s else None
    if parts and len(parts) > 1 and all(_assignment(part) for part in parts):
        s = ",".join(_assignment(part)[1] for part in parts)  # `x=1,x=2` lists the values 1 and 2
    return s, percent


def _relation(s: str) -> tuple[str, str] | None:
    """(left, right) of a normalized answer that is one equation (`2x+4y-3=0`, `y=2x`); None otherwise."""
    if s.count("=") != 1 or re.search(r"[<>!:]=|=[<>]", s):
        return None
    left, right = s.split("=")
    parts = split_top(s)
    return (left, right) if left and right and parts is not None and len(parts) == 1 else None


def _assignment(s: str) -> tuple[str, str] | None:
    """(variable, value) when s is one equation whose left side names a single variable (`x=5`, `f(x)=2x+1`)."""
    relation = _relation(s)
    return relation if relation and _ASSIGNED.fullmatch(relation[0]) else None


# ---------------------------------------------------------------------------------------------------------------
# Public API


def _decide(model_answer: str, ground_truth: str, fast: bool) -> tuple[bool | None, list[tuple[str, str]], bool]:
    """Stages 1-2 and the guard: (verdict, pairs for the symbolic stage, whether the pairs are equations as
    `left - right`). The verdict is None when the symbolic stage must decide one of the pairs."""
    if max(len(model_answer), len(ground_truth)) > MAX_ANSWER_CHARS:
        return bool(model_answer.strip()) and model_answer.strip() == ground_truth.strip(), [], False
    a, percent_a = _normalize(model_answer)
    b, percent_b = _normalize(ground_truth)
    if not a or not b:
        return False, [], False
    if a == b:
        return True, [], False
    if any(len(s) > MAX_SYMBOLIC_CHARS or brace_depth(s) > MAX_BRACE_DEPTH for s in (a, b)):
        return False, [], False  # too long, too deep or unbalanced for any parser: only an identical string matches
    relation_a, relation_b = _relation(a), _relation(b)
    if relation_a and relation_b and relation_a[0] != relation_b[0]:
        verdict = compare_relations(*relation_a, *relation_b)
        if verdict is True or (verdict is False and fast):
            return verdict, [], False
        if refuse_symbolic(a) or refuse_symbolic(b):
            return False, [], False
        return None, [(f"({relation_a[0]})-({relation_a[1]})", f"({relation_b[0]})-({relation_b[1]})")], True
    if relation_a and relation_b:  # the same left side (`x=...`, `f(x)=...`): compare the right sides
        a, b = relation_a[1], relation_b[1]
    else:  # an equation equals a bare value only when its left side is one variable: `x = 5` and `5`
        a, b = (_assignment(a) or (None, a))[1], (_assignment(b) or (None, b))[1]
    if ("=" in a) != ("=" in b):
        return False, [], False  # a relation never equals one of its sides, nor a bare expression
    if a == b:
        return True, [], False
    a, b = align_tuple(a, b)
    if not percent_a and not percent_b:
        # Words before algebra, in both modes: `no` and `on` are different answers, though equal as products.
        text = compare_text(a, b)
        if text is not None:
            return text, [], False
    verdict = fast_compare(a, b, percent_a, percent_b)
    if verdict is True or (verdict is False and fast):
        return verdict, [], False
    if refuse_symbolic(a) or refuse_symbolic(b):
        return False, [], False
    a, b = braced_list(a), braced_list(b)
    pairs = [(a, b)] + [(f"\\frac{{{a}}}{{100}}", b)] * percent_a + [(a, f"\\frac{{{b}}}{{100}}")] * percent_b
    return None, pairs, False


def _settle(model_answer: str, ground_truth: str, fast: bool) -> bool | None:
    """True/False when decided without sympy, None when the symbolic stage must decide."""
    return _decide(model_answer, ground_truth, fast)[0]


def normalize_answer(answer: str) -> str:
    """The grader's string normal form (e.g. `\\dfrac12` -> `\\frac{1}{2}`, `1,000` -> `1000`): a cheap key for
    grouping answers, e.g. majority votes. Equal keys imply `grade` equality; the converse does not hold."""
    return _normalize(answer)[0] if len(answer) <= MAX_ANSWER_CHARS else answer.strip()


def fast_equivalent(a: str, b: str) -> bool:
    """True only when the string and exact-arithmetic stages prove `a` and `b` equivalent (`0.5` and `\\frac{1}{2}`);
    never calls sympy, so it cannot hang on a pathological answer: for grouping many answers (majority votes) in
    the main process, where `grade_batch`'s time-limited workers are not at hand."""
    return _settle(a, b, fast=True) is True


def grade(model_answer: str, ground_truth: str, fast: bool = True) -> bool:
    """Whether two answers are mathematically equivalent; symmetric in its two arguments.

    Args:
        model_answer: extracted answer text (LaTeX or plain); a `\\boxed{}` around it is unwrapped.
        ground_truth: reference answer text, same format.
        fast: trust the fast stages' "not equal" verdicts (default). False double-checks every such verdict
            with math-verify/sympy: slower, used to cross-check the fast stages.

    Returns:
        True when equivalent. Empty answers, answers the guard refuses and unparseable answers are never equal
        (unless string-identical after normalization). Runs in the calling process with no time limit: use
        `grade_batch` for untrusted model output.
    """
    verdict, pairs, relations = _decide(model_answer, ground_truth, fast)
    if verdict is not None:
        return verdict
    compare = relations_equal if relations else symbolic_equal
    return any(compare(x, y) for x, y in pairs)


def _as_list(ground_truth: str | list[str]) -> list[str]:
    return [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)


def _reward(format_ok: bool, correct: bool) -> dict[str, float]:
    return {"format_reward": float(format_ok), "answer_reward": float(correct), "reward": float(format_ok and correct)}


def r1_zero_reward_fn(response: str, ground_truth: str | list[str], fast: bool = True) -> dict[str, float]:
    """Reward of one response in the r1_zero format (`... </think> <answer> ANSWER </answer>`).

    Args:
        response: model output after the prompt's `<think>`.
        ground_truth: reference answer, or a list of acceptable answers (any match counts).
        fast: passed to `grade`.

    Returns:
        {"format_reward", "answer_reward", "reward"} floats in {0, 1}. Format needs "</think> <answer>" and
        "</answer>"; without it all three are 0. The answer is read from the text after the last "<answer>" with
        "</answer>" removed by `answer_candidates`: boxes win (the last alone, or all together as a list), else
        math spans the same way (`Answer $ 9 $` -> 9), else the whole text. An empty or unclosed box is
        formatted (1) but wrong (0).
    """
    format_ok, answers = extract_r1_zero_answers(response)
    if not format_ok:
        return _reward(False, False)
    return _reward(True, any(a and grade(a, g, fast) for a in answers for g in _as_list(ground_truth)))


def question_only_reward_fn(response: str, ground_truth: str | list[str], fast: bool = True) -> dict[str, float]:
    """Reward of a free-form response (no tags): grade its last `\\boxed{}`, or its last number when it has none.

    Args:
        response: model output.
        ground_truth: reference answer or list of acceptable answers.
        fast: passed to `grade`.

    Returns:
        {"format_reward", "answer_reward", "reward"} floats: format_reward is 1 when a `\\boxed{}` was found;
        reward equals answer_reward (a correct last number counts even without a box).
    """
    boxed, answer = _question_only_answer(response)
    correct = bool(answer) and any(grade(answer, g, fast) for g in _as_list(ground_truth))
    return {"format_reward": float(boxed), "answer_reward": float(correct), "reward": float(correct)}


def _prepass(answers: list[str], ground_truths: list[str]) -> bool | None:
    verdicts = [_settle(a, g, fast=True) if a else False for a in answers for g in ground_truths]
    return True if True in verdicts else (None if None in verdicts else False)


def _r1_zero_prepass(response: str, ground_truth: str | list[str]) -> tuple[dict[str, float], bool]:
    format_ok, answers = extract_r1_zero_answers(response)
    if not format_ok:
        return _reward(format_ok, False), True
    verdict = _prepass(answers, _as_list(ground_truth))
    return _reward(True, bool(verdict)), verdict is not None


def _question_only_prepass(response: str, ground_truth: str | list[str]) -> tuple[dict[str, float], bool]:
    boxed, answer = _question_only_answer(response)
    verdict = _prepass([answer], _as_list(ground_truth))
    correct = float(bool(verdict))
    return {"format_reward": float(boxed), "answer_reward": correct, "reward": correct}, verdict is not None


# The reward functions whose fast stages grade_batch can run in the calling process: fn -> (response, gt) ->
# (reward if settled, else the reward to report on timeout; settled). Other reward_fns run wholly in workers.
_PREPASS: dict[Callable, Callable] = {r1_zero_reward_fn: _r1_zero_prepass,
                                      question_only_reward_fn: _question_only_prepass}



def grade_batch(responses: list[str], ground_truths: list[str | list[str]], workers: int | None = None,
                timeout_s: float = 5.0, reward_fn: Callable = r1_zero_reward_fn) -> list[dict]:
    """Grade many responses with a hard per-item time limit; the batch always finishes.

    For `r1_zero_reward_fn` and `question_only_reward_fn`, format checks and the fast stages run here (most
    items end there); the rest go to worker processes started with `spawn`. Any other reward_fn (it must be
    picklable: a module-level function or a functools.partial of one) runs wholly in the workers. A worker whose
    item exceeds timeout_s (counted from when the item was sent) is killed and replaced; workers also cap their
    address space at 4 GiB above start-up (Linux), so a runaway computation fails with MemoryError (graded wrong).
    There is no in-process mode: a timeout can only be enforced on a process that can be killed. The caller's
    script must guard its entry point with `if __name__ == "__main__":` (spawn re-imports it).

    Args:
        responses: model outputs, length N.
        ground_truths: reference answer (or list of acceptable answers) per response, length N.
        workers: worker processes, >= 1; started only when some item needs them. None = min(4, CPU count).
        timeout_s: seconds one item may spend in a worker (> 0).
        reward_fn: `(response, ground_truth) -> {"format_reward", "answer_reward", "reward"}`.

    Returns:
        N dicts in input order: reward_fn's keys plus "timed_out" (bool) and "settled_by" ("fast": here, without
        sympy; "worker"; "timeout": over the limit, answer and reward 0; "crashed": the worker died, 0).
        A timed-out r1_zero item keeps its format_reward (its format was checked here).
    """
    return run_batch(responses, ground_truths, reward_fn, _PREPASS.get(reward_fn), workers, timeout_s)
