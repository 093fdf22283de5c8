"""The grader's stage 2: a small exact evaluator for normalized LaTeX answers (`utils.drgrpo_grader` stage 1 output).

Reads numbers (a decimal is the exact rational it spells), `\\frac`, `\\sqrt`, `\\pi`, `\\infty`, powers, factorials
and single-letter variables (compared at fixed rational points), with Fractions (floats once `\\sqrt` or `\\pi`
appear); `compare_scalars` tells whether two expressions are one value, `compare_relations` whether two equations
are one. Answer shapes (tuples, intervals, sets, bare lists read as sets, pmatrix, words) are taken apart in
`utils.answer_shapes`, which compares their items here. Nothing here can run unbounded: exponents, factorials,
exact integer sizes and list lengths are capped (`MAX_EXPONENT`, `MAX_FACTORIAL`, `MAX_EXACT_BITS`, `MAX_LIST_ITEMS`;
the last is applied in `utils.answer_shapes`).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_LIST_ITEMS = 32  # longer lists go to the symbolic stage: item-by-item matching is quadratic in their length
MAX_EXPONENT = 10_000  # 2^{2007} passes, 9^{9^{9}} (exponent 387,420,489) not; also bounds \binom arguments
MAX_FACTORIAL = 1000
MAX_EXACT_BITS = 10_000  # above this size an exact power falls back to floats (which may overflow -> undecided)


class Undecided(Exception):
    """The fast evaluator met something it does not model; the symbolic stage decides."""


_TOKEN = re.compile(r"\d+\.\d+|\d+|\\[a-zA-Z]+|\\[{}]|\S")
_GREEK = {"\\alpha", "\\beta", "\\gamma", "\\delta", "\\theta", "\\lambda", "\\mu", "\\sigma", "\\phi", "\\omega"}
_ATOM_START = {"\\frac", "\\sqrt", "\\pi", "\\infty", "(", "{"} | _GREEK


class Parser:
    """Recursive-descent parser from normalized LaTeX to a tuple AST; raises Undecided outside its grammar."""

    def __init__(self, text: str):
        self.tokens = [t for t in _TOKEN.findall(text) if t != " "]
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise Undecided
        self.pos += 1
        return token

    def parse(self) -> tuple:
        node = self.expr()
        if self.peek() is not None:
            raise Undecided
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
                    raise Undecided
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
                    raise Undecided  # TeX takes one character: x^23 is x^2 * 3
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
        raise Undecided


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


def evaluate(node: tuple, env: dict[str, Fraction]) -> _Val:
    """Value of an AST at one assignment of its variables; raises Undecided on overflow, complex or huge results."""
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
        x = evaluate(node[1], env)
        return _Val(-x.exact if x.exact is not None else None, -x.approx if x.approx is not None else None, x.decimal)
    if kind == "fact":
        x = evaluate(node[1], env)
        if x.exact is None or x.exact.denominator != 1 or not 0 <= x.exact <= MAX_FACTORIAL:
            raise Undecided
        return _Val.of_exact(Fraction(math.factorial(int(x.exact))), x.decimal)
    if kind == "root":
        return _root(evaluate(node[1], env), evaluate(node[2], env) if node[2] is not None else None)
    a, b = evaluate(node[1], env), evaluate(node[2], env)
    decimal = a.decimal or b.decimal
    if math.isinf(a.approx or 0.0) or math.isinf(b.approx or 0.0):
        raise Undecided  # arithmetic on infinity: only a bare (possibly negated) \infty is compared
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
            raise Undecided
        return _Val.of_exact(a.exact / b.exact, decimal)
    if a.approx is None or b.approx is None:
        raise Undecided
    if kind == "add":
        value = a.approx + b.approx
    elif kind == "sub":
        value = a.approx - b.approx
    elif kind == "mul":
        value = a.approx * b.approx
    elif b.approx == 0:
        raise Undecided
    else:
        value = a.approx / b.approx
    if not math.isfinite(value):
        raise Undecided
    return _Val(None, value, decimal)


def _power(base: _Val, exponent: _Val, decimal: bool) -> _Val:
    e = exponent.exact
    if base.exact is not None and e is not None and e.denominator == 1 and abs(e) <= MAX_EXPONENT:
        size = max(base.exact.numerator.bit_length(), base.exact.denominator.bit_length()) * abs(int(e))
        if size <= MAX_EXACT_BITS and not (base.exact == 0 and e < 0):
            return _Val.of_exact(base.exact ** int(e), decimal)
    if base.approx is None or exponent.approx is None or (base.approx < 0 and (e is None or e.denominator != 1)):
        raise Undecided
    try:
        value = math.pow(base.approx, exponent.approx)
    except (OverflowError, ValueError, ZeroDivisionError):
        raise Undecided from None
    return _Val(None, value, decimal)


def _root(x: _Val, index: _Val | None) -> _Val:
    n = 2 if index is None else index.exact
    if n is None or n.denominator != 1 or not 2 <= n <= 10:
        raise Undecided
    n = int(n)
    if x.exact is not None and (x.exact >= 0 or n % 2 == 1):
        sign = -1 if x.exact < 0 else 1
        num, den = abs(x.exact.numerator), x.exact.denominator
        if max(num.bit_length(), den.bit_length()) <= MAX_EXACT_BITS:
            rn, rd = _integer_root(num, n), _integer_root(den, n)
            if rn is not None and rd is not None:
                return _Val.of_exact(sign * Fraction(rn, rd), x.decimal)
    if x.approx is None or (x.approx < 0 and n % 2 == 0):
        raise Undecided
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
    """Equality of two values: exact when both are exact (a decimal is the exact rational it spells, so 0.3333333 is
    not 1/3); two exact forms (radicals, pi) agreeing to 12 digits are equal; anything closer than 1e-6 that is not
    proven equal is left to sympy."""
    if a.approx is not None and math.isinf(a.approx) or b.approx is not None and math.isinf(b.approx):
        return a.approx == b.approx
    if a.exact is not None and b.exact is not None:
        return a.exact == b.exact
    if a.approx is None or b.approx is None:
        return None
    if math.isclose(a.approx, b.approx, rel_tol=1e-12, abs_tol=1e-12) and not (a.decimal or b.decimal):
        return True  # exact forms agreeing to 12 digits: the same number for any MATH answer
    if not math.isclose(a.approx, b.approx, rel_tol=1e-6, abs_tol=1e-9):
        return False
    return None  # a decimal this close to a radical or pi: sympy decides exactly


def _parse(text: str) -> tuple | None:
    try:
        return Parser(text).parse()
    except (Undecided, RecursionError, ValueError):
        return None


def compare_scalars(a: str, b: str) -> bool | None:
    """Equality of two scalar expressions at fixed rational points; None when it cannot be proven either way."""
    tree_a, tree_b = _parse(a), _parse(b)
    if tree_a is None or tree_b is None:
        return None
    try:
        names = sorted(_variables(tree_a) | _variables(tree_b))
        if len(names) > len(_POINTS[0]):
            return None
        verdicts = set()
        for point in _POINTS:
            env = dict(zip(names, point))
            verdicts.add(_compare_values(evaluate(tree_a, env), evaluate(tree_b, env)))
    except (Undecided, ZeroDivisionError, OverflowError, ValueError, RecursionError):
        return None
    return False if False in verdicts else (None if None in verdicts else True)


_THIRD_POINT = [Fraction(p, q) for p, q in [(43, 7), (-19, 3), (11, 17), (-47, 13), (7, 19), (-5, 23), (103, 29),
                                            (-73, 31)]]


def compare_relations(left_a: str, right_a: str, left_b: str, right_b: str) -> bool | None:
    """Whether `left_a = right_a` and `left_b = right_b` are one equation: left - right of one is a nonzero constant
    times the other's. Exact values at three points; different zeros or ratios prove them different."""
    trees = [_parse(text) for text in (left_a, right_a, left_b, right_b)]
    if any(tree is None for tree in trees):
        return None
    diff_a, diff_b = ("sub", trees[0], trees[1]), ("sub", trees[2], trees[3])
    names = sorted(_variables(diff_a) | _variables(diff_b))
    if not names or len(names) > len(_THIRD_POINT):
        return None
    ratios = []
    try:
        for point in (*_POINTS, _THIRD_POINT):
            env = dict(zip(names, point))
            va, vb = evaluate(diff_a, env).exact, evaluate(diff_b, env).exact
            if va is None or vb is None:
                return None
            if (va == 0) != (vb == 0):
                return False
            if va != 0:
                ratios.append(vb / va)
    except (Undecided, KeyError, ZeroDivisionError, OverflowError, ValueError, RecursionError):
        return None
    if len(set(ratios)) > 1:
        return False
    return True if len(ratios) >= 2 else None
