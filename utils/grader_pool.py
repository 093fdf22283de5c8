"""The grader's slow side, fenced in: the guard that refuses inputs sympy could spend unbounded work on, the
math-verify/sympy calls (stage 3), and the worker processes that run them, killed when an item passes its limit.

`utils.drgrpo_grader` decides what to compare (stages 1-2 and the policy on relations, tuples and decimals); this
module only runs comparisons with bounded cost: `refuse_symbolic` first, then `symbolic_equal`/`relations_equal`,
in-process for `grade` and in `run_batch`'s workers for `grade_batch`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import time
from collections import deque
from multiprocessing.connection import wait as wait_for_connections
from typing import Callable

from utils.exact_math import MAX_EXPONENT, MAX_FACTORIAL, Parser, Undecided, evaluate

MAX_SYMBOLIC_CHARS = 1000  # the longest MATH answers are ~200 characters
MAX_BRACE_DEPTH = 20  # MATH answers nest a few levels; a 20,000-character nested \frac nests thousands
MAX_SYMBOLIC_EXPONENT = 100  # (x+1)^{10000} makes sympy expand ten thousand terms

# ---------------------------------------------------------------------------------------------------------------
# Guard: inputs sympy must never see

def brace_depth(s: str) -> int:
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


_GROUP_CLOSE = {"{": "}", "(": ")", "[": "]"}


def _operand_end(s: str, i: int) -> int:
    """End (exclusive) of the operand starting at s[i]: a brace, parenthesis or bracket group (`2^(x+1)` as well as
    `2^{x+1}`) or one token, with any `^` chain after it; an unclosed group runs to the end."""
    if i < len(s) and s[i] in _GROUP_CLOSE:
        opener, closer, depth, end = s[i], _GROUP_CLOSE[s[i]], 0, len(s)
        for j in range(i, len(s)):
            depth += 1 if s[j] == opener else -1 if s[j] == closer else 0
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
        value = evaluate(Parser(text).parse(), {})
    except (Undecided, ZeroDivisionError, ValueError, RecursionError):
        return math.inf  # digits only, yet too big (or malformed) to evaluate within the bounds: refuse
    return abs(value.approx) if value.approx is not None else math.inf


def refuse_symbolic(s: str) -> bool:
    """Whether s could make sympy run unbounded work (huge powers, factorials, binomials, size): refused answers
    are graded wrong without being parsed."""
    if len(s) > MAX_SYMBOLIC_CHARS or brace_depth(s) > MAX_BRACE_DEPTH or re.search(r"\d{1001}", s):
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

# ---------------------------------------------------------------------------------------------------------------
# Stage 3: math-verify and sympy, on inputs the guard let through


def _exact_decimals(s: str) -> str:
    """`2.5` -> `{\frac{25}{10}}`: sympy then compares the rational the decimal spells, never a rounded float."""
    return re.sub(r"(?<![\d.])(\d*)\.(\d+)", lambda m: f"{{\\frac{{{m[1]}{m[2]}}}{{1{'0' * len(m[2])}}}}}", s)


def _parse_latex(s: str) -> list:
    from math_verify import parse  # imported on first use: the fast stages never need sympy

    return parse(f"${_exact_decimals(s)}$", parsing_timeout=None)


def symbolic_equal(a: str, b: str) -> bool:
    """math-verify equivalence on exact decimals, the same whichever side is the reference."""
    from math_verify import verify
    from sympy import And, Set
    from sympy.core.relational import Relational

    try:
        parsed_a, parsed_b = _parse_latex(a), _parse_latex(b)
        if not parsed_a or not parsed_b:
            return False
        forward = verify(parsed_a, parsed_b, timeout_seconds=None)
        if forward == verify(parsed_b, parsed_a, timeout_seconds=None):
            return forward
        # The roles disagree. The one asymmetry accepted: verify(gold, target) compares an inequality with an
        # interval (`1<x<2` vs `(1,2)`) only when the target is the interval; any other disagreement is a
        # one-sided reading (a relation's right side, say) and counts as not equal.
        kinds = [(isinstance(p[0], (Relational, And)), isinstance(p[0], Set)) for p in (parsed_a, parsed_b)]
        return (kinds[0][0] and kinds[1][1]) or (kinds[0][1] and kinds[1][0])
    except Exception:  # sympy raises many types on malformed input; an answer it cannot read is not correct
        return False


def relations_equal(diff_a: str, diff_b: str) -> bool:
    """Whether two `left - right` expressions differ by a nonzero constant factor (the same equation, scaled)."""
    import sympy

    try:
        parsed_a, parsed_b = _parse_latex(diff_a), _parse_latex(diff_b)
        if not parsed_a or not parsed_b or not all(isinstance(p[0], sympy.Expr) for p in (parsed_a, parsed_b)):
            return False
        ratio = sympy.simplify(parsed_a[0] / parsed_b[0])
        return bool(ratio.is_number and ratio.is_finite and ratio.is_zero is False)
    except Exception:
        return False


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
    from math_verify import parse, verify

    # import sympy/math-verify and build the parser before any clock starts
    warm_up = [parse(text, parsing_timeout=None) for text in ("$\\frac{1}{2}+x$", "$x+0.5$")]
    verify(*warm_up, timeout_seconds=None)
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


def run_workers(items: deque[int], responses, ground_truths, reward_fn, workers: int, timeout_s: float,
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


def run_batch(responses: list[str], ground_truths: list, reward_fn: Callable, prepass: Callable | None,
              workers: int | None, timeout_s: float) -> list[dict]:
    """`utils.drgrpo_grader.grade_batch`: prepass each item here when `prepass` is given (`(response, ground_truth)
    -> (reward, settled)`), then grade the unsettled ones in `run_workers`."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError("workers must be >= 1: the per-item timeout needs a worker process it can kill")
    if timeout_s <= 0:
        raise ValueError("timeout_s must be > 0")
    results: list[dict | None] = [None] * len(responses)
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
