"""The grader's stage 2 on answer shapes: tuples, intervals, sets, bare lists (read as sets), pmatrix and words.

`fast_compare` takes two normalized answers (`utils.drgrpo_grader` stage 1 output) apart into their shape and
compares item by item with `utils.exact_math.compare_scalars`; it returns a verdict only when it can prove it and
None otherwise, so the symbolic stage decides. `compare_text` settles answers that are words; `align_tuple`,
`braced_list` and `split_top` prepare answers for the other stages. Lists longer than `MAX_LIST_ITEMS` are left
to the symbolic stage.
"""

from __future__ import annotations

import re

from utils.exact_math import MAX_LIST_ITEMS, compare_scalars


_OPEN, _CLOSE = ("(", "[", "{", "\\{"), (")", "]", "}", "\\}")


def split_top(s: str) -> list[str] | None:
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
    inner = split_top(s[open_len:-close_len].replace(",", ""))
    return inner is not None and len(s) > open_len + close_len


def _structure(s: str) -> tuple[str, object] | None:
    """('scalar', s) | ('seq', (open, close, parts)) | ('set', parts) | ('matrix', rows); None for other shapes."""
    if s.startswith("\\begin{pmatrix}") and s.endswith("\\end{pmatrix}"):
        body = s[len("\\begin{pmatrix}") : -len("\\end{pmatrix}")]
        return "matrix", [row.split("&") for row in body.split("\\\\")]
    if "\\cup" in s or "\\begin" in s:
        return None
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s, 2, 2):
        parts = split_top(s[2:-2])
        return ("set", parts) if parts else None
    if s[0] in "([" and s[-1] in ")]" and _encloses(s, 1, 1):
        parts = split_top(s[1:-1])
        if parts and len(parts) > 1:
            return "seq", (s[0], s[-1], parts)
    parts = split_top(s)
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
    """Lists as sets, as math-verify reads them (`1, 1, 2` = `2, 1`): every item of each side equals an item of the
    other. Items may be tuples (`(1,2), (3,4)`)."""
    if len(a) > MAX_LIST_ITEMS or len(b) > MAX_LIST_ITEMS:
        return None
    verdicts = [[_compare_structures(x, y) for y in b] for x in a]
    undecided = False
    for line in verdicts + [list(column) for column in zip(*verdicts)]:
        if True in line:
            continue
        if None not in line:
            return False
        undecided = True
    return None if undecided else True


def braced_list(s: str) -> str:
    """A bare list `1, 2` as the set `\\{1,2\\}` for the symbolic stage, which would read `32,349` as one number."""
    structure = _structure(s) if s else None
    return f"\\{{{s}\\}}" if structure and structure[0] == "set" and not s.startswith("\\{") else s


def align_tuple(a: str, b: str) -> tuple[str, str]:
    """An ordered tuple against a bare list or a set: the list is read as a tuple in its written order, so `(3,1)`
    is not `1,3` (math-verify would compare them as sets) while `(1,3)` is. Other pairs come back unchanged."""
    if not a or not b:
        return a, b
    sa, sb = _structure(a), _structure(b)
    if sa is None or sb is None:
        return a, b
    for (x, sx), (y, sy), swap in (((a, sa), (b, sb), False), ((b, sb), (a, sa), True)):
        if sx[0] == "seq" and sx[1][:2] == ("(", ")") and sy[0] == "set":
            y = "(" + ",".join(sy[1]) + ")"
            return (y, x) if swap else (x, y)
    return a, b


def _compare_structures(a: str, b: str) -> bool | None:
    sa, sb = _structure(a), _structure(b)
    if sa is None or sb is None or sa[0] != sb[0]:
        return None  # e.g. a tuple against a set: math-verify knows these conventions
    kind, x, y = sa[0], sa[1], sb[1]
    if kind == "scalar":
        return compare_scalars(x, y)
    if kind == "set":
        return _compare_sets(x, y)
    if kind == "seq":
        if x[:2] != y[:2] or len(x[2]) != len(y[2]):  # brackets are part of the answer: [1,2) != [1,2]
            return False
        return _all(compare_scalars(p, q) for p, q in zip(x[2], y[2]))
    if [len(row) for row in x] != [len(row) for row in y]:
        return False
    return _all(compare_scalars(p, q) for row_x, row_y in zip(x, y) for p, q in zip(row_x, row_y))


def _plain_text(s: str) -> str:
    """Lower-case plain text of a LaTeX string (pylatexenc renders `\\emph{odd}`, accents, ...), spaces removed."""
    from pylatexenc.latex2text import LatexNodes2Text

    if "\\" in s:
        try:
            s = LatexNodes2Text().latex_to_text(s)
        except Exception:  # pylatexenc is tolerant by default; anything it still rejects is not a word answer
            return ""
    return re.sub(r"^\((\w)\)$", r"\1", re.sub(r"\s+", "", s).rstrip(".")).lower()


def compare_text(a: str, b: str) -> bool | None:
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


def fast_compare(a: str, b: str, percent_a: bool, percent_b: bool) -> bool | None:
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
