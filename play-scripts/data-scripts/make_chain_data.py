"""Build the miniature study's task: sums of several two-digit numbers, one two-digit addition with carries per step,
in the r1_zero response format.

    python play-scripts/data-scripts/make_chain_data.py --out-dir data/miniature     # the miniature's default sizes
    python play-scripts/data-scripts/make_chain_data.py --out-dir /tmp/chain --num-gold 64 --num-problems 64 \\
        --num-val 16 --num-test 16                                                  # smoke

Each step of a solution is exactly one CPU-demo trace (make_demo_data.py: two columns, the carry stated), so the
demo's model knows every step but not the chaining: copying the running sum forward and adding the next number.
A half-trained model makes copyable mistakes there (a running sum copied wrong, a carry dropped); that is what makes
its wrong traces worth filtering out. Every running sum but the last stays below 100, so every step is a two-digit
addition. The response ends at `</answer>` like the MATH traces (no EOS):

    " 7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8. So 47 + 38 = 85. 5 + 9 = 14, write 4 carry 1. 8 + 2 + 1 = 11.
     So 85 + 29 = 114. </think> <answer> 114 </answer>"

Writes four files of distinct problems, written whole and then renamed (a re-run replaces them): gold.jsonl
(problems with gold responses: the teacher's own training data), problems.jsonl (problems the teacher answers; the
students learn from its traces), val.jsonl (in-loop validation) and test.jsonl (held out for evaluate_reason.py).
"""

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.helper_fns import DATA_DIR, append_jsonl, load_records  # noqa: E402

SPLITS = ("gold", "problems", "val", "test")


def step_text(a: int, b: int) -> str:
    """One two-digit addition explained as the CPU demo explains it: ones column with its carry, then tens."""
    lo = a % 10 + b % 10
    carry = lo // 10
    hi = a // 10 + b // 10 + carry
    ones = f"{a % 10} + {b % 10} = {lo}, " + (f"write {lo % 10} carry 1." if carry else f"write {lo}.")
    tens = f"{a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {hi}."
    return f"{ones} {tens} So {a} + {b} = {a + b}."


def chain_record(terms: tuple[int, ...], with_response: bool) -> dict:
    """The problem `What is t1 + t2 + ...?`; with_response adds the step-by-step solution."""
    record = {"problem": f"What is {' + '.join(map(str, terms))}?", "expected_answer": str(sum(terms))}
    if with_response:
        steps, total = [], terms[0]
        for t in terms[1:]:
            steps.append(step_text(total, t))
            total += t
        record["response"] = f" {' '.join(steps)} </think> <answer> {total} </answer>"
    return record


def sample_chains(num_terms: int, count: int, seed: int, exclude: set[str]) -> list[tuple[int, ...]]:
    """`count` distinct chains of two-digit numbers whose running sums stay below 100 until the last term, none of
    whose problem texts is in `exclude` (rejection sampling: a chain whose first terms sum to 100 or more is
    redrawn)."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(100 * count + 100_000):
        chain = tuple(rng.randint(10, 99) for _ in range(num_terms))
        if sum(chain[:-1]) < 100 and chain not in seen and chain_record(chain, False)["problem"] not in exclude:
            seen.add(chain)
            out.append(chain)
            if len(out) == count:
                return out
    raise SystemExit(f"could not draw {count} distinct {num_terms}-term chains outside --exclude; ask for fewer")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(DATA_DIR / "miniature"), help="output folder")
    p.add_argument("--terms", type=int, default=2, help="two-digit numbers per problem (>= 2; 2 = the CPU demo's task)")
    p.add_argument("--exclude", nargs="*", default=[],
                   help="record files whose problems must not be drawn (e.g. the demo's)")
    p.add_argument("--num-gold", type=int, default=2000,
                   help="problems with gold responses for training a teacher (0 = none, as in the miniature)")
    p.add_argument("--num-problems", type=int, default=3000, help="problems for the teacher to answer")
    p.add_argument("--num-val", type=int, default=200, help="in-loop validation problems")
    p.add_argument("--num-test", type=int, default=500, help="held-out test problems")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = {"gold": args.num_gold, "problems": args.num_problems, "val": args.num_val, "test": args.num_test}
    if args.terms < 2 or min(sizes.values()) < 0 or min(args.num_problems, args.num_val, args.num_test) < 1:
        p.error(f"--terms must be >= 2, --num-gold >= 0 and the other sizes >= 1; got --terms {args.terms}, {sizes}")
    exclude = {rec["problem"] for path in args.exclude for _, rec in load_records(path)}
    chains = sample_chains(args.terms, sum(sizes.values()), args.seed, exclude)
    if exclude:
        print(f"--exclude: {len(exclude)} problems of {', '.join(args.exclude)} left out")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, start = {}, 0
    for name in SPLITS:
        if sizes[name] == 0:
            continue
        chunk = chains[start : start + sizes[name]]
        start += sizes[name]
        path = out / f"{name}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        append_jsonl(tmp, [chain_record(terms, with_response=name != "problems") for terms in chunk])
        tmp.replace(path)
        written[name] = path
        print(f"wrote {len(chunk)} records to {path}")
    return written


if __name__ == "__main__":
    main()
