"""Speed of the math grader: grade a seeded set of realistic r1_zero responses with grade_batch, report answers/s.

    python play-scripts/bench-scripts/bench_grader.py                        # 5,000 responses, 2 workers
    python play-scripts/bench-scripts/bench_grader.py --num 500 --out /tmp/grader.json   # smoke run

The set mimics MATH answers (integers, fractions, radicals, multiples of pi, decimals, tuples, intervals, sets,
multiple choice and word answers, polynomials, matrices, a few functions only sympy reads) and model behaviour:
the reference form, an equivalent rewrite, a wrong answer, or a broken format, answers boxed half the time.
Each response carries the verdict it was built to have, so the script also counts disagreements with the grader.

Target (issue 3): 5,000 responses in <= 10 s on 2 CPU cores. Measured with the defaults on a 2-core CPU container
shared with other jobs (load average ~2.5), 2026-11-26, Python 3.11.7, sympy 1.14.0, math-verify 0.9.0: 2.2 s =
2,300 answers/s (3.6 s under heavier load), 4,908 of 5,000 (98.2%) settled without sympy, 92 sent to workers,
0 timeouts, 0 disagreements with the built-in labels. The settling pass takes ~0.25 s; the rest is worker start-up
(spawn + sympy import, ~1 s) and ~25 ms of math-verify per worker item.

2026-11-29, after the relation / list / exact-decimal fixes, at load average 5-7 (wall times then vary 9-40 s
for both versions): the settling pass takes 0.53 s of CPU (0.51-0.53 s before), the 92 worker items 4.0 s of CPU
(4.2-4.8 s before); still 4,908 settled without sympy and 0 disagreements.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.drgrpo_grader import grade_batch  # noqa: E402

FILLER = ("Let me set up the problem. We substitute the given values and simplify step by step. "
          "Checking the boundary cases, the expression stays consistent. ")


def _integer(rng: random.Random) -> tuple[str, list[str], list[str]]:
    n = rng.choice([rng.randint(0, 30), rng.randint(-50, 500), rng.randint(1000, 99999)])
    same = [f"{n}.0", f"x = {n}", f"{n}^\\circ"] + ([f"{n:,}"] if n >= 1000 else [])
    wrong = [str(n + rng.choice([-2, -1, 1, 3, 10])), str(n)[::-1] + "1", str(2 * n + 1)]
    return str(n), same, wrong


def _fraction(rng: random.Random) -> tuple[str, list[str], list[str]]:
    q = rng.randint(2, 40)
    p = rng.choice([k for k in range(1, 3 * q) if Fraction(k, q).denominator == q])
    same = [f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\frac{{{2 * p}}}{{{2 * q}}}", f"\\tfrac{{{p}}}{{{q}}}"]
    if 10**6 % q == 0:
        same.append(str(float(Fraction(p, q))))
    wrong = [f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{p + 1}}}{{{q}}}", f"\\frac{{{p}}}{{{q + 1}}}"]
    if 1000 % q:  # rounded to 3 places only when that changes the value (0.333 is not 1/3)
        wrong.append(f"{p / q:.3f}")
    return f"\\frac{{{p}}}{{{q}}}", same, wrong


def _radical(rng: random.Random) -> tuple[str, list[str], list[str]]:
    a, b, c = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7, 10, 11, 13]), rng.randint(2, 7)
    if rng.random() < 0.5:
        gt = f"{a}\\sqrt{{{b}}}"
        same = [f"\\sqrt{{{a * a * b}}}", f"\\sqrt{{{b}}} \\cdot {a}"] + ([f"{a} \\sqrt{b}"] if b < 10 else [])
        wrong = [f"{a}\\sqrt{{{b + 1}}}", f"{a + 1}\\sqrt{{{b}}}", f"\\sqrt{{{b}}}", str(a * b)]
    else:
        gt = f"\\frac{{{a}\\sqrt{{{b}}}}}{{{c}}}"
        same = [f"\\frac{{{a}}}{{{c}}}\\sqrt{{{b}}}", f"\\dfrac{{{a} \\sqrt{{{b}}}}}{{{c}}}", f"{a}\\sqrt{{{b}}}/{c}"]
        wrong = [f"\\frac{{{a}\\sqrt{{{b}}}}}{{{c + 1}}}", f"\\frac{{{c}\\sqrt{{{b}}}}}{{{a + c}}}",
                 f"{a}\\sqrt{{{b}}}"]
    return gt, same, wrong


def _pi(rng: random.Random) -> tuple[str, list[str], list[str]]:
    k, d = rng.randint(2, 50), rng.choice([2, 3, 4, 6])
    if rng.random() < 0.5:
        return f"{k}\\pi", [f"{k} \\pi", f"\\pi \\cdot {k}"], [f"{k + 1}\\pi", str(k), f"{k}\\pi^2"]
    same, wrong = [f"\\frac{{{k}}}{{{d}}}\\pi", f"{k}\\pi/{d}"], [f"\\frac{{\\pi}}{{{d}}}", f"{k}\\pi"]
    return f"\\frac{{{k}\\pi}}{{{d}}}", same, wrong


def _decimal(rng: random.Random) -> tuple[str, list[str], list[str]]:
    value = Fraction(rng.randint(1, 999), 100)
    text = f"{float(value):.2f}".rstrip("0").rstrip(".")
    return text, [f"{float(value):.2f}", f"\\frac{{{value.numerator}}}{{{value.denominator}}}"], [
        f"{float(value) + 0.1:.2f}", f"{float(value):.1f}" if value * 10 % 1 else f"{float(value) * 10:g}"]


def _tuple(rng: random.Random) -> tuple[str, list[str], list[str]]:
    a, b = rng.randint(-9, 9), rng.randint(-9, 9)
    b = b if b != a else a + 1
    gt = f"({a}, {b})"
    return gt, [f"({a},{b})", f"\\left( {a}, {b} \\right)"], [f"({b}, {a})", f"({a}, {b + 1})", f"({a}, {b}, 0)"]


def _interval(rng: random.Random) -> tuple[str, list[str], list[str]]:
    a, b = sorted(rng.sample(range(-20, 20), 2))
    if rng.random() < 0.3:
        gt = f"(-\\infty, {a}] \\cup [{b}, \\infty)"
        return gt, [f"(-\\infty,{a}]\\cup[{b},\\infty)"], [f"(-\\infty, {a}) \\cup ({b}, \\infty)"]
    gt = f"[{a}, {b})"
    return gt, [f"[{a},{b})", f"\\left[ {a}, {b} \\right)"], [f"[{a}, {b}]", f"({a}, {b})", f"[{a}, {b + 1})"]


def _answer_set(rng: random.Random) -> tuple[str, list[str], list[str]]:
    values = sorted(rng.sample(range(-10, 20), 3))
    gt = ", ".join(map(str, values))
    return gt, [", ".join(map(str, values[::-1])), "\\{" + ",".join(map(str, values)) + "\\}"], [
        ", ".join(map(str, values[:2])), ", ".join(map(str, values[:2] + [values[2] + 1]))]


def _word(rng: random.Random) -> tuple[str, list[str], list[str]]:
    if rng.random() < 0.6:
        letter, other = rng.sample("ABCDE", 2)
        same = [letter, f"({letter})", f"\\textbf{{({letter})}}"]
        return f"\\text{{({letter})}}", same, [other, f"\\text{{({other})}}"]
    word, other = rng.sample(["Monday", "Friday", "even", "odd", "Devon", "yes", "no", "north"], 2)
    return f"\\text{{{word}}}", [word, word.lower(), f"\\text{{ {word} }}"], [other, f"\\text{{{other}}}"]


def _polynomial(rng: random.Random) -> tuple[str, list[str], list[str]]:
    a, b, c = rng.randint(1, 9), rng.randint(-9, 9), rng.randint(-9, 9)
    gt = f"{a}x^2 {'+' if b >= 0 else '-'} {abs(b)}x {'+' if c >= 0 else '-'} {abs(c)}"
    same = [f"{c} + {b}x + {a}x^2".replace("+ -", "- "), gt.replace(" ", ""), f"{a}x^{{2}}+{b}x+{c}".replace("+-", "-")]
    wrong = [f"{a}x^2+{b + 1}x+{c}".replace("+-", "-"), f"{a + 1}x^2+{b}x+{c}".replace("+-", "-"), f"{a}x+{b}"]
    return gt, same, wrong


def _matrix(rng: random.Random) -> tuple[str, list[str], list[str]]:
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    gt = f"\\begin{{pmatrix}} {x} \\\\ {y} \\end{{pmatrix}}"
    return gt, [f"\\begin{{pmatrix}}{x}\\\\{y}\\end{{pmatrix}}", f"\\begin{{bmatrix}} {x} \\\\ {y} \\end{{bmatrix}}"], [
        f"\\begin{{pmatrix}} {y + 1} \\\\ {x} \\end{{pmatrix}}",
        f"\\begin{{pmatrix}} {x} \\\\ {y + 2} \\end{{pmatrix}}"]


def _sympy_only(rng: random.Random) -> tuple[str, list[str], list[str]]:
    # Answers outside the fast evaluator's grammar (functions, logs, e): these exercise the worker processes.
    k = rng.randint(2, 9)
    return rng.choice([
        (f"\\log_2 {k}", [f"\\log_{{2}} {k}", f"\\log_2{{{k}}}"], [f"\\log_3 {k}", f"\\log_2 {k + 1}"]),
        (f"e^{{{k}}}", [f"e^{k}"], [f"e^{{{k + 1}}}", f"{k}e"]),
        (f"\\sin {k}x", [f"\\sin({k}x)"], [f"\\cos {k}x", f"\\sin {k + 1}x"]),
    ])


# Shares loosely follow MATH test answers: mostly integers, then fractions, radicals and expressions.
CATEGORIES = [(_integer, 45), (_fraction, 13), (_radical, 8), (_pi, 4), (_decimal, 3), (_tuple, 5), (_interval, 4),
              (_answer_set, 2), (_word, 4), (_polynomial, 6), (_matrix, 2), (_sympy_only, 4)]


def make_responses(num: int, seed: int) -> tuple[list[str], list[str], list[float], list[str]]:
    """Seeded (responses, ground truths, built-in rewards, kinds).

    45% reference form, 17% equivalent rewrite, 33% wrong, 5% broken format; the answer is boxed half the time.
    """
    rng = random.Random(seed)
    makers, weights = zip(*CATEGORIES)
    responses, ground_truths, expected, kinds = [], [], [], []
    for _ in range(num):
        maker = rng.choices(makers, weights)[0]
        gt, same, wrong = maker(rng)
        roll = rng.random()
        answer, reward, kind = (gt, 1.0, "reference") if roll < 0.45 else (
            (rng.choice(same), 1.0, "rewrite") if roll < 0.62 else (rng.choice(wrong), 0.0, "wrong"))
        inner = f"\\boxed{{{answer}}}" if rng.random() < 0.5 else answer
        thinking = FILLER * rng.randint(2, 12)
        if roll > 0.95:  # broken format: a missing space or a missing closing tag
            response = rng.choice([f"{thinking}</think><answer> {inner} </answer>",
                                   f"{thinking}</think> <answer> {inner}"])
            reward, kind = 0.0, "bad-format"
        else:
            response = f"{thinking}</think> <answer> {inner} </answer>"
        responses.append(response)
        ground_truths.append(gt)
        expected.append(reward)
        kinds.append(f"{maker.__name__[1:]}/{kind}")
    return responses, ground_truths, expected, kinds


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("sympy", "math-verify", "latex2sympy2_extended", "pylatexenc"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=5000, help="responses to grade")
    parser.add_argument("--workers", type=int, default=2, help="grader worker processes (>= 1)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="seconds one item may spend in a worker")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated responses")
    parser.add_argument("--out", default="results/bench/grader.json", help="JSON report path (relative to the cwd)")
    args = parser.parse_args()

    responses, ground_truths, expected, kinds = make_responses(args.num, args.seed)
    start = time.perf_counter()
    results = grade_batch(responses, ground_truths, workers=args.workers, timeout_s=args.timeout_s)
    seconds = time.perf_counter() - start

    settled_by = Counter(r["settled_by"] for r in results)
    disagreements = [(k, r, g, x["reward"]) for k, r, g, e, x in zip(kinds, responses, ground_truths, expected, results)
                     if x["reward"] != e]
    for kind, response, gt, reward in disagreements[:10]:
        print(f"disagrees ({kind}): answer {response.split('<answer>')[-1]!r} vs {gt!r} -> reward {reward}")
    report = {
        "num": args.num,
        "seconds": round(seconds, 3),
        "answers_per_s": round(args.num / seconds, 1),
        "settled_by": dict(settled_by),
        "fast_share": round(settled_by["fast"] / args.num, 4),
        "timed_out": sum(r["timed_out"] for r in results),
        "mean_reward": round(sum(r["reward"] for r in results) / args.num, 4),
        "disagreements_with_construction": len(disagreements),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "args": vars(args),
    }
    print(f"graded {args.num} responses in {seconds:.2f} s = {report['answers_per_s']:.0f} answers/s | "
          f"fast path {settled_by['fast']} ({100 * report['fast_share']:.1f}%) | workers {settled_by['worker']} | "
          f"timeouts {report['timed_out']} | mean reward {report['mean_reward']:.3f} | "
          f"disagreements {len(disagreements)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
