"""Make the MATH training problems: hiyouga/math12k (train + test) minus every problem of the val set.

    python play-scripts/data-scripts/make_math_splits.py          # reads the hub dataset and data/sft-reason/val.jsonl
    python play-scripts/data-scripts/make_math_splits.py --math12k-files tests/fixtures/data/math12k_train.jsonl \\
        tests/fixtures/data/math12k_test.jsonl --val-file tests/fixtures/data/math_val.jsonl \\
        --output /tmp/math_train_problems.jsonl                  # smoke: local stand-ins, no network

Problems are compared after normalization (NFKC; `\\dfrac`/`\\tfrac` -> `\\frac`; `\\left`/`\\right`, spacing
commands and all whitespace removed), so a val problem re-typeset with other spacing is still removed. The script
reports how many were removed, how many val problems were not found in math12k, and drops repeated problems
(keeping the first). Output: JSON Lines `{problem, expected_answer}`, written atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.dataloader import KEY_ALIASES  # noqa: E402
from utils.helper_fns import DATA_DIR, append_jsonl, load_records  # noqa: E402

MATH12K = "hiyouga/math12k"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val-file", default=str(DATA_DIR / "sft-reason" / "val.jsonl"),
                   help="val problems to exclude, {problem, expected_answer} (download_data.py --only sft-reason)")
    p.add_argument("--math12k-files", nargs="*", default=[],
                   help="local JSON Lines/JSON files with {problem, answer} instead of the hub dataset "
                        "(tests, offline)")
    p.add_argument("--output", default=str(DATA_DIR / "sft-reason" / "math_train_problems.jsonl"),
                   help="JSON Lines output")
    return p.parse_args(argv)


def normalize_problem(text: str) -> str:
    """Whitespace- and typesetting-insensitive form of a problem statement, for matching only."""
    s = unicodedata.normalize("NFKC", text)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]|~", "", s)  # thin/medium/thick/negative spaces, control space, tie
    return re.sub(r"\s+", "", s)


def pick(rec: dict, key: str, loc: str) -> str:
    """The value of `key` under any of its accepted names (utils.dataloader.KEY_ALIASES); errors name `loc`."""
    for alias in KEY_ALIASES[key]:
        if alias in rec:
            value = rec[alias]
            if not isinstance(value, str):
                raise ValueError(f"{loc}: {alias!r} is {type(value).__name__}, expected a string")
            return value
    raise ValueError(f"{loc}: record has no {key!r} (accepted keys: {', '.join(KEY_ALIASES[key])})")


def load_math12k(files: list[str]) -> list[tuple[str, dict]]:
    """(location, record) pairs from local files, or from the hub dataset's train and test splits."""
    if files:
        return [pair for f in files for pair in load_records(f)]
    from datasets import load_dataset

    out = []
    for split in ("train", "test"):
        ds = load_dataset(MATH12K, split=split)
        out += [(f"{MATH12K}[{split}][{i}]", dict(row)) for i, row in enumerate(ds)]
        print(f"{MATH12K} {split}: {len(ds):,} problems")
    return out


def main(args: argparse.Namespace) -> dict:
    """Write the training problems. Returns the counts printed in the summary."""
    val = load_records(args.val_file)
    val_keys = {normalize_problem(pick(rec, "problem", loc)) for loc, rec in val}
    source = load_math12k(args.math12k_files)

    kept, seen = [], set()
    removed_val = duplicates = 0
    found_val = set()
    for loc, rec in source:
        problem = pick(rec, "problem", loc)
        answer = pick(rec, "expected_answer", loc)
        key = normalize_problem(problem)
        if key in val_keys:
            removed_val += 1
            found_val.add(key)
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            kept.append({"problem": problem, "expected_answer": answer})

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    append_jsonl(tmp, kept)
    os.replace(tmp, out)
    stats = {
        "math12k": len(source),
        "removed_in_val": removed_val,
        "val_problems": len(val_keys),
        "val_not_in_math12k": len(val_keys) - len(found_val),
        "duplicates": duplicates,
        "written": len(kept),
    }
    print(
        f"math12k {len(source):,} problems: removed {removed_val:,} in the val set "
        f"({len(val_keys) - len(found_val):,} of {len(val_keys):,} val problems not in math12k), "
        f"{duplicates:,} repeats; wrote {len(kept):,} to {out}"
    )
    return stats


if __name__ == "__main__":
    main(parse_args())
