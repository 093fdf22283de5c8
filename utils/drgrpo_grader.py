"""Math answer grading for reasoning SFT: r1_zero / question-only rewards and a batch grader that never hangs.

    from utils.drgrpo_grader import r1_zero_reward_fn, grade, grade_batch
    r1_zero_reward_fn("... </think> <answer> \\boxed{\\dfrac12} </answer>", "0.5")   # 1/1/1
    grade_batch(responses, ground_truths, workers=2, timeout_s=5.0)                # list of reward dicts

`grade(a, b)` decides equivalence in three stages, cheapest first:
  1. String: both sides are normalized (`\\left`/`\\right`, spacing commands, `\\dfrac`, units in `\\text{}`, degrees,
     `\\%`, `\\$`, thousands separators, trailing `.0`, a leading `x =`) and compared.
  2. Fast values (`utils/exact_math.py`): a small exact evaluator (Fractions; floats once `\\sqrt` or `\\pi`
     appear) reads numbers, `\\frac`, `\\sqrt`, `\\pi`, `\\infty`, powers, factorials and single-letter variables
     (checked at two fixed rational points), inside tuples, intervals, sets, bare lists and pmatrix. It returns a
     verdict only when it understood both sides.
  3. Symbolic: math-verify (`parse`/`verify` in both roles, their SIGALRM timeouts off) plus a sympy check with
     relative tolerance `REL_TOL` when a side is written as a decimal. Before it, a guard refuses inputs that could
     make sympy run unbounded (exponents above 10,000 or towers, an expression raised above the 100th power, n! with
     n > 1000, \\binom arguments above 10,000, >1000 characters, brace depth >20, unbalanced braces, non-ASCII):
     they are graded wrong without being parsed. Conventions taken from math-verify: `2\\frac{1}{3}` is a mixed
     number, `2^10` means 2^{10}, a trailing unit word is dropped (`5 apples` = 5).

Decimals: a side written with a decimal point equals an exact value only within `REL_TOL` = 1e-6 relative, so
`0.333` != `1/3` but `3.14159265` = `\\pi`. Exact forms are compared exactly (or to 1e-12 when irrational).

`grade_batch` runs stages 1-2 in the calling process and sends only unsettled items to worker processes
(`utils/grader_pool.py`) that it kills and replaces when an item exceeds `timeout_s` (concurrent.futures cannot
stop a running task, and SIGALRM cannot interrupt a long big-integer operation inside C). Measured with play-scripts/bench-scripts/bench_grader.py
(5,000 seeded MATH-style responses, 2 workers, timeout 5 s): 2.2 s = 2,300 answers/s, 3.6 s under heavier load,
98.2% settled by stages 1-2, 0 disagreements with the built-in labels; 2-core CPU container shared with other
jobs (load average ~2.5), 2026-11-26, Python 3.11.7, sympy 1.14.0, math-verify 0.9.0, latex2sympy2_extended 1.11.0,
pylatexenc 2.11.
"""

from __future__ import annotations

import os
import re
from collections import deque
from typing import Callable

from utils.exact_math import REL_TOL, compare_text, fast_compare
from utils.grader_pool import MAX_BRACE_DEPTH, MAX_SYMBOLIC_CHARS, brace_depth, refuse_symbolic, run_workers

# ---------------------------------------------------------------------------------------------------------------
# Answer extraction


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\boxed x`) in text; None when absent or its brace never closes."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # `\boxed 5`: TeX takes one token; models write it for short answers
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match and start + len("\\boxed") < i else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_r1_zero_answer(response: str) -> tuple[bool, str]:
    """(format ok, answer text) under the r1_zero contract; the answer is '' when a `\\boxed` is empty or unclosed."""
    if "</think> <answer>" not in response or "</answer>" not in response:
        return False, ""
    answer = response.split("<answer>")[-1].replace("</answer>", "")
    if "\\boxed" in answer:
        answer = _last_boxed(answer) or ""
    return True, answer.strip()


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
_ASSIGNMENT = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?(?:=|\\in(?![a-zA-Z]))")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _strip_decimal_zeros(match: re.Match) -> str:
    number = match.group(0).rstrip("0")
    return number[:-1] if number.endswith(".") else number


def _normalize(answer: str) -> tuple[str, bool]:
    """Canonical string form of an answer and whether it carried a percent sign.

    Removes only notation that never changes the value in MATH answers; the percent sign is returned separately
    because `50\\%` must equal both `50` (the issue's convention) and `0.5`.
    """
    s = answer.strip()
    if "\\boxed" in s:
        s = _last_boxed(s) or ""
    for char, replacement in _UNICODE.items():
        s = s.replace(char, replacement)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)\.", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", "\\\\frac", s).replace("\\dbinom", "\\binom").replace("bmatrix", "pmatrix")
    s = re.sub(r"(?<!\\)\\(?:[!,;: ]|q?quad(?![a-zA-Z]))|~", " ", s)  # not the `\\ ` of a matrix row break
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", s)
    percent = "%" in s
    s = s.replace("\\%", "").replace("%", "")
    s = _TEXT_UNITS.sub("", s)
    s = _BARE_UNITS.sub("", s)
    s = re.sub(r"\\text\{\s*(?:and|or)\s*\}", ",", s)
    for _ in range(3):  # nested \text{\textbf{...}}
        s = _TEXT_CMD.sub(r"\1", s)
    # Spaces carry no meaning except between a command and a following letter (`\pi r`): keep exactly those.
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x01", s)
    s = re.sub(r"\s+", "", s).replace("\x01", " ")
    s = s.rstrip(".")  # sentence-final period
    if s.count("=") + len(re.findall(r"\\in(?![a-zA-Z])", s)) == 1:
        s = _ASSIGNMENT.sub("", s, count=1)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)  # x^{2} -> x^2
    s = s.replace("{,}", "")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d.])\.(?=\d)", "0.", s)
    s = re.sub(r"\d+\.\d+", _strip_decimal_zeros, s)
    s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # multiple choice: (B) -> B
    if s.isalpha() and s.isascii():
        s = s.lower()
    return s, percent


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: math-verify and sympy (after the guard in utils/grader_pool.py)


def _symbolic_equal(a: str, b: str) -> bool:
    """math-verify equivalence in either role, then a sympy numeric check with REL_TOL; symmetric by construction."""
    from math_verify import parse, verify  # imported on first use: the fast stages never need sympy

    try:
        parsed_a = parse(f"${a}$", parsing_timeout=None)
        parsed_b = parse(f"${b}$", parsing_timeout=None)
        if not parsed_a or not parsed_b:
            return False
        # verify(gold, target) is not symmetric: it compares a relation with an interval (`1<x<2` vs `(1,2)`)
        # only when the target is the interval. Equivalence should not depend on which side is the reference.
        return (verify(parsed_a, parsed_b, timeout_seconds=None) or verify(parsed_b, parsed_a, timeout_seconds=None)
                or _sympy_close(parsed_a[0], parsed_b[0]))
    except Exception:  # sympy raises many types on malformed input; an answer it cannot read is not correct
        return False


def _sympy_close(x: object, y: object) -> bool:
    """Relative-tolerance equality for numbers when one side is written as a decimal (`3.14159265` = `\\pi`)."""
    import sympy

    if not all(isinstance(v, sympy.Expr) and v.is_number for v in (x, y)):
        return False
    if not (x.has(sympy.Float) or y.has(sympy.Float)):
        return False
    vx, vy = complex(sympy.N(x, 30)), complex(sympy.N(y, 30))
    return abs(vx - vy) <= REL_TOL * max(abs(vx), abs(vy))


# ---------------------------------------------------------------------------------------------------------------
# Public API


def _settle(model_answer: str, ground_truth: str, fast: bool) -> bool | None:
    """Stages 1-2 and the guard: True/False when decided without sympy, None when the symbolic stage must decide."""
    a, percent_a = _normalize(model_answer)
    b, percent_b = _normalize(ground_truth)
    if not a or not b:
        return False
    if a == b:
        return True
    if any(len(s) > MAX_SYMBOLIC_CHARS or brace_depth(s) > MAX_BRACE_DEPTH for s in (a, b)):
        return False  # too long, too deep or unbalanced for any parser: only an identical string matches
    if not percent_a and not percent_b:
        # Words before algebra, in both modes: `no` and `on` are different answers, though equal as products.
        text = compare_text(a, b)
        if text is not None:
            return text
    verdict = fast_compare(a, b, percent_a, percent_b)
    if verdict is True or (verdict is False and fast):
        return verdict
    if refuse_symbolic(a) or refuse_symbolic(b):
        return False
    return None


def normalize_answer(answer: str) -> str:
    """The grader's string normal form (e.g. `\\dfrac12` -> `\\frac{1}{2}`, `1,000` -> `1000`, `x = 5` -> `5`): a cheap
    key for grouping answers, e.g. majority votes. Equal keys imply `grade` equality; the converse does not hold."""
    return _normalize(answer)[0]


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
    verdict = _settle(model_answer, ground_truth, fast)
    if verdict is not None:
        return verdict
    a, percent_a = _normalize(model_answer)
    b, percent_b = _normalize(ground_truth)
    candidates = [(a, b)] + [(f"\\frac{{{a}}}{{100}}", b)] * percent_a + [(a, f"\\frac{{{b}}}{{100}}")] * percent_b
    return any(_symbolic_equal(x, y) for x, y in candidates)


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
        "</answer>"; without it all three are 0. The answer is the text after the last "<answer>" with "</answer>"
        removed, or the content of its last `\\boxed{}`; an empty box is formatted (1) but wrong (0).
    """
    format_ok, answer = extract_r1_zero_answer(response)
    if not format_ok:
        return _reward(False, False)
    return _reward(True, bool(answer) and any(grade(answer, g, fast) for g in _as_list(ground_truth)))


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


def _prepass(answer: str, ground_truths: list[str]) -> bool | None:
    verdicts = [_settle(answer, g, fast=True) for g in ground_truths]
    return True if True in verdicts else (None if None in verdicts else False)


def _r1_zero_prepass(response: str, ground_truth: str | list[str]) -> tuple[dict[str, float], bool]:
    format_ok, answer = extract_r1_zero_answer(response)
    if not format_ok or not answer:
        return _reward(format_ok, False), True
    verdict = _prepass(answer, _as_list(ground_truth))
    return _reward(True, bool(verdict)), verdict is not None


def _question_only_prepass(response: str, ground_truth: str | list[str]) -> tuple[dict[str, float], bool]:
    boxed, answer = _question_only_answer(response)
    verdict = _prepass(answer, _as_list(ground_truth)) if answer else False
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
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError("workers must be >= 1: the per-item timeout needs a worker process it can kill")
    if timeout_s <= 0:
        raise ValueError("timeout_s must be > 0")
    results: list[dict | None] = [None] * len(responses)
    prepass = _PREPASS.get(reward_fn)
    pending: deque[int] = deque()
    on_failure: dict[int, dict] = {}
    for i, (response, ground_truth) in enumerate(zip(responses, ground_truths)):
        if prepass is None:
            pending.append(i)
            on_failure[i] = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
            continue
        reward, settled = prepass(response, ground_truth)
        if settled:
            results[i] = {**reward, "timed_out": False, "settled_by": "fast"}
        else:
            pending.append(i)
            on_failure[i] = reward  # answer 0, format as checked
    if pending:
        run_workers(pending, responses, ground_truths, reward_fn, workers, timeout_s, results, on_failure)
    return results
