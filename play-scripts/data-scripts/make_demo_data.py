"""Build the bundled demo data: two-digit addition in the r1_zero response format, with a one-line carry explanation.

    python play-scripts/data-scripts/make_demo_data.py            # writes data/demo/{train,val}.jsonl

The demo trains a tiny model from scratch on CPU in minutes, so the task must be learnable by ~1M parameters yet
still need the reasoning format: the response explains the column sums, then gives the answer in
`</think> <answer> ... </answer>`, graded by the same r1_zero grader as MATH. Train and val pairs are disjoint.
"""

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.helper_fns import DATA_DIR, append_jsonl  # noqa: E402


def addition_record(a: int, b: int) -> dict:
    """One problem with its explained response; ends at `</answer>` like the MATH traces (no EOS)."""
    lo = a % 10 + b % 10
    carry = lo // 10
    hi = a // 10 + b // 10 + carry
    carry_text = f"write {lo % 10} carry 1" if carry else f"write {lo}"
    hi_text = f"{a // 10} + {b // 10} + 1 = {hi}" if carry else f"{a // 10} + {b // 10} = {hi}"
    response = (f" {a % 10} + {b % 10} = {lo}, {carry_text}. {hi_text}. So {a} + {b} = {a + b}. "
                f"</think> <answer> {a + b} </answer>")
    return {"problem": f"What is {a} + {b}?", "response": response, "expected_answer": str(a + b)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(DATA_DIR / "demo"), help="output folder")
    parser.add_argument("--num-train", type=int, default=3000, help="training problems")
    parser.add_argument("--num-val", type=int, default=200, help="validation problems (disjoint from train)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the shuffle that picks the problems (same seed = same files)")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        parser.error(f"--num-train ({args.num_train}) and --num-val ({args.num_val}) must be at least 1")
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(args.seed).shuffle(pairs)
    if args.num_train + args.num_val > len(pairs):
        raise SystemExit(f"--num-train + --num-val > {len(pairs)} distinct two-digit pairs")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("val", pairs[: args.num_val]), ("train", pairs[args.num_val : args.num_val + args.num_train])):
        path = out / f"{name}.jsonl"
        tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed over the old file
        tmp.unlink(missing_ok=True)
        append_jsonl(tmp, [addition_record(a, b) for a, b in chunk])
        tmp.replace(path)
        print(f"wrote {len(chunk)} records to {path}")


if __name__ == "__main__":
    main()
