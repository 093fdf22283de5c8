"""Math answer grading for reasoning SFT: r1_zero / question-only rewards and a batch grader that never hangs.

    from utils.drgrpo_grader import r1_zero_reward_fn, grade, grade_batch
    r1_zero_reward_fn("... </think> <answer> \\boxed{\\dfrac12} </answer>", "0.5")   # 1/1/1
    grade_batch(responses, ground_truths, workers=2, timeout_s=5.0)                # list of reward dicts

`grade(a, b)` decides equivalence in three stages, cheapest first:
  1. String: both sides are normalized (`\\left`/`\\right`, spacing commands, `\\dfrac`, units in `\\text{}`, degrees,
     `\\%`, `\\$`, thousands separators, trailing `.0`, a leading `x =`) and compared.
  2. Fast values: a small exact evaluator (Fractions; floats once `\\sqrt` or `\\pi` appear) reads numbers, `\\frac`,
     `\\sqrt`, `\\pi`, `\\infty`, powers, factorials and single-letter variables (checked at two fixed rational points),
     inside tuples, intervals, sets, bare lists and pmatrix. It returns a verdict only when it understood both sides.
  3. Symbolic: math-verify (`parse`/`verify` in both roles, their SIGALRM timeouts off) plus a sympy check with
     relative tolerance `REL_TOL` when a side is written as a decimal. Before it, a guard refuses inputs that could
     make sympy run unbounded (exponents above 10,000 or towers, an expression raised above the 100th power, n! with
     n > 1000, \\binom arguments above 10,000, >1000 characters, brace depth >20, unbalanced braces, non-ASCII):
     they are graded wrong without being parsed. Conventions taken from math-verify: `2\\frac{1}{3}` is a mixed
     number, `2^10` means 2^{10}, a trailing unit word is dropped (`5 apples` = 5).

Decimals: a side written with a decimal point equals an exact value only within `REL_TOL` = 1e-6 relative, so
`0.333` != `1/3` but `3.14159265` = `\\pi`. Exact forms are compared exactly (or to 1e-12 when irrational).

`grade_batch` runs stages 1-2 in the calling process and sends only unsettled items to worker processes that it
kills and replaces when an item exceeds `timeout_s` (concurrent.futures cannot stop a running task, and SIGALRM
cannot interrupt a long big-integer operation inside C). Measured with play-scripts/bench-scripts/bench_grader.py
(5,000 seeded MATH-style responses, 2 workers, timeout 5 s): 2.2 s = 2,300 answers/s, 3.6 s under heavier load,
98.2% settled by stages 1-2, 0 disagreements with the built-in labels; 2-core CPU container shared with other
jobs (load average ~2.5), 2026-11-26, Python 3.11.7, sympy 1.14.0, math-verify 0.9.0, latex2sympy2_extended 1.11.0,
pylatexenc 2.11.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import time
from collections import deque
from fractions import Fraction
from multiprocessing.connection import wait as wait_for_connections
from typing import Callable

REL_TOL = 1e-6  # decimals vs exact values; 0.333 vs 1/3 differs by 1e-3 relative, rounding noise in 7+ digits passes
MAX_SYMBOLIC_CHARS = 1000  # the longest MATH answers are ~200 characters
MAX_BRACE_DEPTH = 20  # MATH answers nest a few levels; a 20,000-character nested \frac nests thousands
MAX_EXPONENT = 10_000  # 2^{2007} passes, 9^{9^{9}} (exponent 387,420,489) not; also bounds \binom arguments
MAX_SYMBOLIC_EXPONENT = 100  # (x+1)^{10000} makes sympy expand ten thousand terms
MAX_FACTORIAL = 1000
MAX_EXACT_BITS = 10_000  # above this size an exact power falls back to floats (which may overflow -> undecided)

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
# Stage 2: a small exact evaluator


class _Undecided(Exception):
    """The fast evaluator met something it does not model; the symbolic stage decides."""


_TOKEN = re.compile(r"\d+\.\d+|\d+|\\[a-zA-Z]+|\\[{}]|\S")
_GREEK = {"\\alpha", "\\beta", "\\gamma", "\\delta", "\\theta", "\\lambda", "\\mu", "\\sigma", "\\phi", "\\omega"}
_ATOM_START = {"\\frac", "\\sqrt", "\\pi", "\\infty", "(", "{"} | _GREEK


class _Parser:
    """Recursive-descent parser from normalized LaTeX to a tuple AST; raises _Undecided outside its grammar."""

    def __init__(self, text: str):
        self.tokens = [t for t in _TOKEN.findall(text) if t != " "]
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _Undecided
        self.pos += 1
        return token

    def parse(self) -> tuple:
        node = self.expr()
        if self.peek() is not None:
            raise _Undecided
        return node

    def expr(self) -> tuple:
        node = self.term()
        while self.peek() in ("+", "-"):
            node = ("add" if self.take() == "+" else "sub", node, self.term())
        return node

    def term(self) -> tuple:
        node, saw_slash = self.unary(), False
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times", "/", "\\div"):
                self.take()
                op = "div" if token in ("/", "\\div") else "mul"
                saw_slash |= token == "/"
                node = (op, node, self.unary())
            elif token is not None and (token in _ATOM_START or token.isalpha() or token[0].isdigit()):
                # `1/2x` reads as 1/(2x) to some and (1/2)x to others; `2\frac12` is a mixed number to others
                if saw_slash or (token == "\\frac" and (node[0] == "num" or node[0] == "neg" and node[1][0] == "num")):
                    raise _Undecided
                node = ("mul", node, self.power())
            else:
                return node

    def unary(self) -> tuple:
        if self.peek() == "-":
            self.take()
            return ("neg", self.unary())
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> tuple:
        node = self.atom()
        while self.peek() in ("^", "!"):
            if self.take() == "!":
                node = ("fact", node)
                continue
            if self.peek() == "{":
                node = ("pow", node, self.group())
            else:
                token = self.take()
                if not (token.isdigit() and len(token) == 1) and not (token.isalpha() and len(token) == 1):
                    raise _Undecided  # TeX takes one character: x^23 is x^2 * 3
                node = ("pow", node, ("num", Fraction(token), False) if token.isdigit() else ("var", token))
        return node

    def group(self) -> tuple:
        self.take("{")
        node = self.expr()
        self.take("}")
        return node

    def atom(self) -> tuple:
        token = self.take()
        if token[0].isdigit():
            return ("num", Fraction(token), "." in token)
        if token == "(":
            node = self.expr()
            self.take(")")
            return node
        if token == "{":
            self.pos -= 1
            return self.group()
        if token == "\\frac":
            return ("div", self.group(), self.group())
        if token == "\\sqrt":
            index = None
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            return ("root", self.group(), index)
        if token == "\\pi":
            return ("pi",)
        if token == "\\infty":
            return ("inf",)
        if token in _GREEK or (len(token) == 1 and token.isascii() and token.isalpha() and token not in "ei"):
            return ("var", token)  # e and i may mean Euler's number / the imaginary unit: leave them to sympy
        raise _Undecided


class _Val:
    """A value: exact Fraction when known, float approximation, and whether a decimal literal fed into it."""

    __slots__ = ("exact", "approx", "decimal")

    def __init__(self, exact: Fraction | None, approx: float | None, decimal: bool):
        self.exact, self.approx, self.decimal = exact, approx, decimal

    @classmethod
    def of_exact(cls, value: Fraction, decimal: bool) -> "_Val":
        try:
            approx = float(value)
        except OverflowError:
            approx = None  # compared exactly, or undecided against an inexact value
        return cls(value, approx, decimal)


def _evaluate(node: tuple, env: dict[str, Fraction]) -> _Val:
    """Value of an AST at one assignment of its variables; raises _Undecided on overflow, complex or huge results."""
    kind = node[0]
    if kind == "num":
        return _Val.of_exact(node[1], node[2])
    if kind == "var":
        return _Val.of_exact(env[node[1]], False)
    if kind == "pi":
        return _Val(None, math.pi, False)
    if kind == "inf":
        return _Val(None, math.inf, False)
    if kind == "neg":
        x = _evaluate(node[1], env)
        return _Val(-x.exact if x.exact is not None else None, -x.approx if x.approx is not None else None, x.decimal)
    if kind == "fact":
        x = _evaluate(node[1], env)
        if x.exact is None or x.exact.denominator != 1 or not 0 <= x.exact <= MAX_FACTORIAL:
            raise _Undecided
        return _Val.of_exact(Fraction(math.factorial(int(x.exact))), x.decimal)
    if kind == "root":
        return _root(_evaluate(node[1], env), _evaluate(node[2], env) if node[2] is not None else None)
    a, b = _evaluate(node[1], env), _evaluate(node[2], env)
    decimal = a.decimal or b.decimal
    if math.isinf(a.approx or 0.0) or math.isinf(b.approx or 0.0):
        raise _Undecided  # arithmetic on infinity: only a bare (possibly negated) \infty is compared
    if kind == "pow":
        return _power(a, b, decimal)
    if a.exact is not None and b.exact is not None:
        if kind == "add":
            return _Val.of_exact(a.exact + b.exact, decimal)
        if kind == "sub":
            return _Val.of_exact(a.exact - b.exact, decimal)
        if kind == "mul":
            return _Val.of_exact(a.exact * b.exact, decimal)
        if b.exact == 0:
            raise _Undecided
        return _Val.of_exact(a.exact / b.exact, decimal)
    if a.approx is None or b.approx is None:
        raise _Undecided
    if kind == "add":
        value = a.approx + b.approx
    elif kind == "sub":
        value = a.approx - b.approx
    elif kind == "mul":
        value = a.approx * b.approx
    elif b.approx == 0:
        raise _Undecided
    else:
        value = a.approx / b.approx
    if not math.isfinite(value):
        raise _Undecided
    return _Val(None, value, decimal)


def _power(base: _Val, exponent: _Val, decimal: bool) -> _Val:
    e = exponent.exact
    if base.exact is not None and e is not None and e.denominator == 1 and abs(e) <= MAX_EXPONENT:
        size = max(base.exact.numerator.bit_length(), base.exact.denominator.bit_length()) * abs(int(e))
        if size <= MAX_EXACT_BITS and not (base.exact == 0 and e < 0):
            return _Val.of_exact(base.exact ** int(e), decimal)
    if base.approx is None or exponent.approx is None or (base.approx < 0 and (e is None or e.denominator != 1)):
        raise _Undecided
    try:
        value = math.pow(base.approx, exponent.approx)
    except (OverflowError, ValueError, ZeroDivisionError):
        raise _Undecided from None
    return _Val(None, value, decimal)


def _root(x: _Val, index: _Val | None) -> _Val:
    n = 2 if index is None else index.exact
    if n is None or n.denominator != 1 or not 2 <= n <= 10:
        raise _Undecided
    n = int(n)
    if x.exact is not None and (x.exact >= 0 or n % 2 == 1):
        sign = -1 if x.exact < 0 else 1
        num, den = abs(x.exact.numerator), x.exact.denominator
        if max(num.bit_length(), den.bit_length()) <= MAX_EXACT_BITS:
            rn, rd = _integer_root(num, n), _integer_root(den, n)
            if rn is not None and rd is not None:
                return _Val.of_exact(sign * Fraction(rn, rd), x.decimal)
    if x.approx is None or (x.approx < 0 and n % 2 == 0):
        raise _Undecided
    return _Val(None, math.copysign(abs(x.approx) ** (1.0 / n), x.approx), x.decimal)


def _integer_root(value: int, n: int) -> int | None:
    root = round(value ** (1.0 / n)) if value < 2**1000 else None
    if root is None:
        return None
    for candidate in (root - 1, root, root + 1):
        if candidate >= 0 and candidate**n == value:
            return candidate
    return None


def _variables(node: tuple) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    return set().union(*(_variables(child) for child in node[1:] if isinstance(child, tuple)))


# Two fixed rational points, one positive and one negative: two different rational functions agree at both only
# when both are roots of their difference, and exact arithmetic keeps polynomial answers exact. The negative point
# tells \sqrt{x^2} (= |x|) from x; where it makes a \sqrt negative the comparison is left to sympy.
_POINTS = (
    [Fraction(p, q) for p, q in [(17, 11), (29, 13), (41, 19), (53, 23), (67, 29), (79, 31), (89, 37), (97, 41)]],
    [Fraction(-p, q) for p, q in [(31, 7), (23, 17), (61, 43), (37, 11), (71, 47), (13, 5), (59, 53), (83, 9)]],
)


def _compare_values(a: _Val, b: _Val) -> bool | None:
    """Equality of two values: exact when both are exact, REL_TOL when a decimal is involved, else floats."""
    if a.approx is not None and math.isinf(a.approx) or b.approx is not None and math.isinf(b.approx):
        return a.approx == b.approx
    if a.exact is not None and b.exact is not None and (a.exact == b.exact or not (a.decimal or b.decimal)):
        return a.exact == b.exact
    if a.approx is None or b.approx is None:
        return None
    if a.decimal or b.decimal:
        return math.isclose(a.approx, b.approx, rel_tol=REL_TOL, abs_tol=1e-12)
    if math.isclose(a.approx, b.approx, rel_tol=1e-12, abs_tol=1e-12):
        return True  # exact forms (radicals, pi) agreeing to 12 digits: the same number for any MATH answer
    if not math.isclose(a.approx, b.approx, rel_tol=1e-6, abs_tol=1e-9):
        return False
    return None


def _compare_scalars(a: str, b: str) -> bool | None:
    try:
        tree_a, tree_b = _Parser(a).parse(), _Parser(b).parse()
        names = sorted(_variables(tree_a) | _variables(tree_b))
        if len(names) > len(_POINTS[0]):
            return None
        verdicts = set()
        for point in _POINTS:
            env = dict(zip(names, point))
            verdicts.add(_compare_values(_evaluate(tree_a, env), _evaluate(tree_b, env)))
    except (_Undecided, ZeroDivisionError, OverflowError, ValueError, RecursionError):
        return None
    return False if False in verdicts else (None if None in verdicts else True)


_OPEN, _CLOSE = ("(", "[", "{", "\\{"), (")", "]", "}", "\\}")


def _split_top(s: str) -> list[str] | None:
    """Split on commas outside any bracket; None when brackets do not balance."""
    parts, depth, start = [], 0, 0
    for token in re.finditer(r"\\[{}]|[()\[\]{},]", s):
        t = token.group(0)
        if t in _OPEN:
            depth += 1
        elif t in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0:
            parts.append(s[start : token.start()])
            start = token.end()
    parts.append(s[start:])
    return parts if depth == 0 else None


def _encloses(s: str, open_len: int, close_len: int) -> bool:
    """Whether the first bracket of s is closed by its last one (so `(1,2)` yes, `(1)+(2)` no)."""
    inner = _split_top(s[open_len:-close_len].replace(",", ""))
    return inner is not None and len(s) > open_len + close_len


def _structure(s: str) -> tuple[str, object] | None:
    """('scalar', s) | ('seq', (open, close, parts)) | ('set', parts) | ('matrix', rows); None for other shapes."""
    if s.startswith("\\begin{pmatrix}") and s.endswith("\\end{pmatrix}"):
        body = s[len("\\begin{pmatrix}") : -len("\\end{pmatrix}")]
        return "matrix", [row.split("&") for row in body.split("\\\\")]
    if "\\cup" in s or "\\begin" in s:
        return None
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s, 2, 2):
        parts = _split_top(s[2:-2])
        return ("set", parts) if parts else None
    if s[0] in "([" and s[-1] in ")]" and _encloses(s, 1, 1):
        parts = _split_top(s[1:-1])
        if parts and len(parts) > 1:
            return "seq", (s[0], s[-1], parts)
    parts = _split_top(s)
    if parts is None:
        return None
    return ("set", parts) if len(parts) > 1 else ("scalar", s)  # a bare list answers "find all x": unordered


def _all(verdicts) -> bool | None:
    seen_none = False
    for verdict in verdicts:
        if verdict is False:
            return False
        seen_none |= verdict is None
    return None if seen_none else True


def _compare_sets(a: list[str], b: list[str]) -> bool | None:
    if len(a) != len(b):
        return False
    unmatched, undecided = list(b), False
    for x in a:
        verdicts = [_compare_scalars(x, y) for y in unmatched]
        if True in verdicts:
            unmatched.pop(verdicts.index(True))
        elif None in verdicts:
            undecided = True
        else:
            return False
    return None if undecided else True


def _compare_structures(a: str, b: str) -> bool | None:
    sa, sb = _structure(a), _structure(b)
    if sa is None or sb is None or sa[0] != sb[0]:
        return None  # e.g. a tuple against a set: math-verify knows these conventions
    kind, x, y = sa[0], sa[1], sb[1]
    if kind == "scalar":
        return _compare_scalars(x, y)
    if kind == "set":
        return _compare_sets(x, y)
    if kind == "seq":
        if x[:2] != y[:2] or len(x[2]) != len(y[2]):  # brackets are part of the answer: [1,2) != [1,2]
            return False
        return _all(_compare_scalars(p, q) for p, q in zip(x[2], y[2]))
    if [len(row) for row in x] != [len(row) for row in y]:
        return False
    return _all(_compare_scalars(p, q) for row_x, row_y in zip(x, y) for p, q in zip(row_x, row_y))


def _plain_text(s: str) -> str:
    """Lower-case plain text of a LaTeX string (pylatexenc renders `\\emph{odd}`, accents, ...), spaces removed."""
    from pylatexenc.latex2text import LatexNodes2Text

    if "\\" in s:
        try:
            s = LatexNodes2Text().latex_to_text(s)
        except Exception:  # pylatexenc is tolerant by default; anything it still rejects is not a word answer
            return ""
    return re.sub(r"^\((\w)\)$", r"\1", re.sub(r"\s+", "", s).rstrip(".")).lower()


def _compare_text(a: str, b: str) -> bool | None:
    """Word answers (`\\text{Monday}`, `\\emph{odd}`, `(C)`): decide only when both read as letters alone.

    Two different letter strings are different words. Read as products of variables (`ab` vs `ba`) they could be
    equal, but MATH writes such answers in one order, and `no` vs `on` must not match.
    """
    if any(c.isdigit() for c in a + b):
        return None
    ta, tb = _plain_text(a), _plain_text(b)
    if all(t.isalpha() and t.isascii() for t in (ta, tb)):  # `\\pi r` renders as `πr`: math, not a word
        return ta == tb
    return None


def _fast_compare(a: str, b: str, percent_a: bool, percent_b: bool) -> bool | None:
    """Stage 2 on normalized strings; a percent side may also be read as a fraction of 100."""
    candidates = [(a, b)]
    if percent_a:
        candidates.append((f"\\frac{{{a}}}{{100}}", b))
    if percent_b:
        candidates.append((a, f"\\frac{{{b}}}{{100}}"))
    verdicts = [_compare_structures(x, y) for x, y in candidates]
    if True in verdicts:
        return True
    return False if all(v is False for v in verdicts) else None


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: guard, then math-verify and sympy


def _brace_depth(s: str) -> int:
    depth = deepest = 0
    for char in s:
        if char == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif char == "}":
            depth -= 1
            if depth < 0:
                return MAX_BRACE_DEPTH + 1
    return deepest if depth == 0 else MAX_BRACE_DEPTH + 1  # unbalanced counts as too deep: refused


def _operand_end(s: str, i: int) -> int:
    """End (exclusive) of the operand starting at s[i]: a brace group or one token, with any `^` chain after it."""
    if i < len(s) and s[i] == "{":
        depth, end = 0, len(s)
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                end = j + 1
                break
    else:
        match = re.match(r"\\[a-zA-Z]+|\d+|.", s[i:])  # digits whole: sympy reads 9^99 as 9^{99}
        end = i + (len(match.group(0)) if match else 0)
    if end < len(s) and s[end] == "^":  # 9^9^9 is a tower: the exponent of the first ^ is 9^9
        return _operand_end(s, end + 1)
    return end


def _operand_start(s: str, i: int) -> int:
    """Start of the operand ending at s[i - 1]: a bracket group, a number, a letter or command, or a factorial;
    a power `a^b` counts whole, so `10^{9}!` is the factorial of 10^9."""
    j = i
    if j > 0 and s[j - 1] == "!":
        j = _operand_start(s, j - 1)
    elif j > 0 and s[j - 1] in ")}]":
        depth = 0
        for k in range(j - 1, -1, -1):
            depth += 1 if s[k] in ")}]" else -1 if s[k] in "({[" else 0
            if depth == 0:
                j = k
                break
        else:
            return 0
    else:
        match = re.search(r"(?:\\[a-zA-Z]+|[a-zA-Z]|[\d.]+)$", s[:j])
        j = match.start() if match else j
    if j > 0 and s[j - 1] == "^":
        return _operand_start(s, j - 1)
    return j


def _numeric_size(text: str) -> float | None:
    """|value| of a numeric-only expression (inf when it overflows); None when it has letters (symbolic)."""
    if re.search(r"[a-zA-Z]", re.sub(r"\\(?:frac|cdot|times|sqrt)", "", text)):
        return None
    try:
        value = _evaluate(_Parser(text).parse(), {})
    except (_Undecided, ZeroDivisionError, ValueError, RecursionError):
        return math.inf  # digits only, yet too big (or malformed) to evaluate within the bounds: refuse
    return abs(value.approx) if value.approx is not None else math.inf


def _refuse_symbolic(s: str) -> bool:
    """Whether s could make sympy run unbounded work (huge powers, factorials, binomials, size): refused answers
    are graded wrong without being parsed."""
    if len(s) > MAX_SYMBOLIC_CHARS or _brace_depth(s) > MAX_BRACE_DEPTH or re.search(r"\d{1001}", s):
        return True
    if any(not c.isascii() for c in s):
        return True  # after normalization, leftover non-ASCII is not math sympy can read
    for match in re.finditer(r"\^", s):
        exponent = _numeric_size(s[match.end() : _operand_end(s, match.end())])
        if exponent is not None and exponent > MAX_EXPONENT:
            return True
        # sympy expands (x+1)^{10000} term by term; no MATH answer raises an expression to more than a few powers
        base_is_symbolic = _numeric_size(s[_operand_start(s, match.start()) : match.start()]) is None
        if exponent is not None and exponent > MAX_SYMBOLIC_EXPONENT and base_is_symbolic:
            return True
    for match in re.finditer(r"!", s):
        size = _numeric_size(s[_operand_start(s, match.start()) : match.start()])
        if size is not None and size > MAX_FACTORIAL:
            return True
    for match in re.finditer(r"\\binom", s):
        top_end = _operand_end(s, match.end())
        for text in (s[match.end() : top_end], s[top_end : _operand_end(s, top_end)]):
            size = _numeric_size(text)
            if size is not None and size > MAX_EXPONENT:
                return True
    return False


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
    if any(len(s) > MAX_SYMBOLIC_CHARS or _brace_depth(s) > MAX_BRACE_DEPTH for s in (a, b)):
        return False  # too long, too deep or unbalanced for any parser: only an identical string matches
    if not percent_a and not percent_b:
        # Words before algebra, in both modes: `no` and `on` are different answers, though equal as products.
        text = _compare_text(a, b)
        if text is not None:
            return text
    verdict = _fast_compare(a, b, percent_a, percent_b)
    if verdict is True or (verdict is False and fast):
        return verdict
    if _refuse_symbolic(a) or _refuse_symbolic(b):
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


# ---------------------------------------------------------------------------------------------------------------
# Process pool with per-item timeout

_WORKER_START_TIMEOUT_S = 120.0  # spawn + importing sympy/math-verify; minutes only on a badly overloaded machine
_WORKER_MEMORY_BYTES = 4 * 2**30  # a runaway sympy call raises MemoryError (graded wrong) before it starves the host


def _worker_main(conn) -> None:
    """Worker loop: grade (index, reward_fn, response, ground_truth) messages until None or the pipe closes."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills its workers
    try:  # on top of what is mapped already: spawn re-imports the parent's script, which may have mapped torch/CUDA
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + _WORKER_MEMORY_BYTES, resource.RLIM_INFINITY))
    except (OSError, ValueError):
        pass  # no /proc (not Linux) or a lower hard limit already in place: rely on the timeout alone
    # The pool enforces time by killing this process, so math-verify's "timeout disabled" warning is expected noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _symbolic_equal("\\frac{1}{2}+x", "x+0.5")  # import sympy/math-verify and build the parser before any clock
    conn.send(("ready", None, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, reward_fn, response, ground_truth = message
        try:
            conn.send((index, reward_fn(response, ground_truth), None))
        except Exception as error:  # report to the parent, which raises: a crashing reward_fn is a bug
            conn.send((index, None, f"{type(error).__name__}: {error}"))


class _Worker:
    """One grading process, its pipe, and the item it works on (index and deadline)."""

    def __init__(self, context):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.deadline = time.monotonic() + _WORKER_START_TIMEOUT_S  # start-up, then the current item's
        self.item: int | None = None

    def send(self, item: int, message: tuple, timeout_s: float) -> None:
        self.item, self.deadline = item, time.monotonic() + timeout_s
        try:
            self.conn.send(message)
        except OSError:
            pass  # the worker just died: wait() reports its closed pipe and the item as crashed

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


def _run_workers(items: deque[int], responses, ground_truths, reward_fn, workers: int, timeout_s: float,
                 results: list, on_failure: dict[int, dict]) -> None:
    """Grade items in up to `workers` processes; a worker whose item runs past timeout_s is killed (item wrong)."""
    context = multiprocessing.get_context("spawn")  # fork would copy a parent's CUDA/vLLM threads and locks
    pool: list[_Worker] = []

    def drop(worker: _Worker, settled_by: str) -> None:
        timed_out = settled_by == "timeout"
        results[worker.item] = {**on_failure[worker.item], "timed_out": timed_out, "settled_by": settled_by}
        worker.kill()
        pool.remove(worker)  # replaced at the top of the loop if work is left

    try:
        while items or any(w.item is not None for w in pool):
            busy = sum(w.item is not None for w in pool)
            while len(pool) < min(workers, len(items) + busy):
                pool.append(_Worker(context))
            for worker in pool:
                if worker.ready and worker.item is None and items:
                    i = items.popleft()
                    worker.send(i, (i, reward_fn, responses[i], ground_truths[i]), timeout_s)
            waiting = [w for w in pool if w.item is not None or not w.ready]
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            for conn in wait_for_connections([w.conn for w in waiting], timeout=timeout):
                worker = next(w for w in pool if w.conn is conn)
                try:
                    index, reward, error = conn.recv()
                except (EOFError, OSError):  # died without answering: the OOM killer, a crash inside C code
                    if not worker.ready:
                        worker.process.join(timeout=5)
                        raise RuntimeError(f"grader worker exited during start-up (code {worker.process.exitcode}); "
                                           "spawn re-imports the caller's __main__, which must be a file")
                    drop(worker, "crashed")
                    continue
                if index == "ready":
                    worker.ready, worker.deadline = True, math.inf
                elif error is not None:
                    raise RuntimeError(f"reward_fn failed on item {index}: {error}")
                else:
                    results[index] = {**reward, "timed_out": False, "settled_by": "worker"}
                    worker.item, worker.deadline = None, math.inf
            now = time.monotonic()
            for worker in [w for w in pool if now >= w.deadline]:
                if not worker.ready:
                    raise RuntimeError(f"grader worker did not start within {_WORKER_START_TIMEOUT_S:.0f} s")
                drop(worker, "timeout")
    finally:
        for worker in pool:
            worker.close()


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
        _run_workers(pending, responses, ground_truths, reward_fn, workers, timeout_s, results, on_failure)
    return results
