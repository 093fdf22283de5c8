"""Download the published SFT and eval data into data/, then check record counts and required keys.

    python play-scripts/data-scripts/download_data.py                              # everything (~0.5 GB)
    python play-scripts/data-scripts/download_data.py --only sft-reason eval       # smoke: skip the 200k-example set

Source: the Hugging Face dataset repo garg-aayush/sft-cs336-assign5-datasets. Files keep their repo paths under
--out-dir (data/sft-reason/val.jsonl, data/sft-instruct/train.jsonl, data/sft-instruct/eval/...), except the hub's
1k-example `sft-instruct/sample_train.jsonl`, saved as `sample_train_1k.jsonl` so it does not replace the bundled
42-example `data/sft-instruct/sample_train.jsonl` that the tests and the CPU demo use.

A file already present with the repo's size is skipped (--force fetches it again); every selected file is then
checked: exact record counts where the publisher states them (3,496 / 4,836 / 5,000 MATH records, 1k sample, GSM8K
1,319, MMLU 14,042 in 57 subject files, SimpleSafetyTests 100, AlpacaEval 805), a floor elsewhere, and the keys
the training and eval code read. The eval folder's layout was not visible when this was written (no network): its
checks match files by name (`*gsm8k*`, `*mmlu*`, ...) and fail listing what was downloaded if nothing matches.
--source DIR copies from a local folder with the repo's layout instead (an offline mirror, or the tests' fake hub).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.helper_fns import DATA_DIR, load_records  # noqa: E402

REPO_ID = "garg-aayush/sft-cs336-assign5-datasets"
LOCAL_NAMES = {"sft-instruct/sample_train.jsonl": "sft-instruct/sample_train_1k.jsonl"}


@dataclass(frozen=True)
class Check:
    """What the files matching `pattern` (fnmatch over repo paths, `*` crosses folders) must hold, summed.

    `keys`: for JSON records, each entry lists accepted alternatives ("problem", "question"); for `csv_header`
    files, required column names. `records`: exact total (None = at least `min_records`). `files`: exact number
    of matching files. `fmt`: "json" (JSON Lines or a JSON array), "csv_header", or "csv_rows" (no header; `columns`
    fields per row).
    """

    pattern: str
    keys: tuple[tuple[str, ...], ...] = ()
    records: int | None = None
    min_records: int = 1
    files: int | None = None
    fmt: str = "json"
    columns: int = 0


REASON_KEYS = (("problem",), ("reasoning_trace", "response"), ("expected_answer",))
SUBSETS: dict[str, dict] = {
    "sft-reason": {
        "files": [
            "sft-reason/sft_gpt-oss-120b_filtered.jsonl", "sft-reason/sft_gpt-oss-120b.jsonl", "sft-reason/val.jsonl",
        ],
        "checks": [
            Check("sft-reason/sft_gpt-oss-120b_filtered.jsonl", REASON_KEYS, records=3496),
            Check("sft-reason/sft_gpt-oss-120b.jsonl", REASON_KEYS, records=4836),
            Check("sft-reason/val.jsonl", (("problem",), ("expected_answer",)), records=5000),
        ],
    },
    "sft-instruct": {
        "files": ["sft-instruct/train.jsonl", "sft-instruct/test.jsonl", "sft-instruct/sample_train.jsonl"],
        "checks": [
            # "~200k" UltraChat + safety examples; the floor catches a truncated file, not an off-by-a-few count.
            Check("sft-instruct/train.jsonl", (("prompt",), ("response",)), min_records=100_000),
            Check("sft-instruct/test.jsonl", (("prompt",), ("response",)), min_records=1_000),
            Check("sft-instruct/sample_train.jsonl", (("prompt",), ("response",)), records=1000),
        ],
    },
    "eval": {
        "prefix": "sft-instruct/eval/",
        "checks": [
            Check("sft-instruct/eval/*gsm8k*test*.jsonl", (("question",), ("answer",)), records=1319),
            Check("sft-instruct/eval/*mmlu*test*.csv", records=14042, files=57, fmt="csv_rows", columns=6),
            Check("sft-instruct/eval/*simple_safety_tests*.csv", (("prompts_final",),), records=100, fmt="csv_header"),
            Check("sft-instruct/eval/*alpaca_eval*.jsonl", (("instruction",),), records=805),
        ],
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(SUBSETS), default=list(SUBSETS),
                   help="subsets to fetch (default: all)")
    p.add_argument("--out-dir", default=str(DATA_DIR), help="destination root; repo paths are kept below it")
    p.add_argument("--repo-id", default=REPO_ID, help="Hugging Face dataset repo")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the dataset repo")
    p.add_argument("--source", default="",
                   help="copy from this local folder (same layout as the repo) instead of the hub")
    p.add_argument("--force", action="store_true", help="fetch every selected file again, even when present")
    return p.parse_args(argv)


# -- where the files come from --------------------------------------------------------------------------------------


def list_remote(args) -> dict[str, int]:
    """Repo path -> size in bytes for every file of the source (the hub repo or the --source folder)."""
    if args.source:
        root = Path(args.source)
        if not root.is_dir():
            raise SystemExit(f"--source {root}: not a folder")
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = HfApi().list_repo_tree(args.repo_id, repo_type="dataset", revision=args.revision, recursive=True)
        return {f.path: f.size for f in tree if isinstance(f, RepoFile)}
    except Exception as e:  # offline, unknown repo or revision: all end here, with the hub's own message
        raise SystemExit(f"cannot list dataset {args.repo_id}@{args.revision} on the Hugging Face Hub: {e}") from None


def fetch(args, repo_path: str, dest: Path) -> None:
    """Copy or download one file to `dest` through a temporary name, so an interrupted fetch leaves no partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    if args.source:
        shutil.copyfile(Path(args.source) / repo_path, tmp)
    else:
        from huggingface_hub import hf_hub_download

        # Staged under out-dir/.cache (git-ignored) so the final rename stays on one filesystem.
        staged = hf_hub_download(
            args.repo_id, repo_path, repo_type="dataset", revision=args.revision,
            local_dir=Path(args.out_dir) / ".cache" / "hub-staging",
        )  # fmt: skip
        os.replace(staged, tmp)
    os.replace(tmp, dest)


# -- checks ---------------------------------------------------------------------------------------------------------


def count_and_check(path: Path, check: Check) -> int:
    """Records in one file, after checking that each has the required keys; errors name `file:line`."""
    if check.fmt == "json":
        records = load_records(path)
        for loc, rec in records:
            for alternatives in check.keys:
                if not any(k in rec for k in alternatives):
                    raise ValueError(f"{loc}: record has no {' / '.join(map(repr, alternatives))}")
        return len(records)
    with open(path, newline="", encoding="utf-8") as f:
        if check.fmt == "csv_header":
            reader = csv.DictReader(f)
            missing = [k for (k,) in check.keys if k not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}:1: header {reader.fieldnames} lacks column(s) {missing}")
            return sum(1 for _ in reader)
        n = 0
        for line_no, row in enumerate(csv.reader(f), start=1):
            if len(row) != check.columns:
                raise ValueError(f"{path}:{line_no}: {len(row)} fields, expected {check.columns}")
            n += 1
        return n


def run_check(check: Check, paths: dict[str, Path]) -> str:
    """Apply one check to the selected files (repo path -> local path); returns a one-line report or raises."""
    matched = sorted(rp for rp in paths if fnmatch.fnmatch(rp.lower(), check.pattern.lower()))
    if not matched:
        listing = "\n  ".join(sorted(paths)) or "(none)"
        raise ValueError(
            f"no downloaded file matches {check.pattern}; the repo layout may have changed. Files:\n  {listing}"
        )
    if check.files is not None and len(matched) != check.files:
        raise ValueError(f"{check.pattern}: {len(matched)} files, expected {check.files}")
    total = sum(count_and_check(paths[rp], check) for rp in matched)
    if check.records is not None and total != check.records:
        raise ValueError(f"{check.pattern}: {total:,} records in {len(matched)} file(s), expected {check.records:,}")
    if total < check.min_records:
        raise ValueError(f"{check.pattern}: {total:,} records, expected at least {check.min_records:,}")
    where = matched[0] if len(matched) == 1 else f"{check.pattern} ({len(matched)} files)"
    return f"ok  {where}: {total:,} records"


def main(args: argparse.Namespace) -> dict:
    """Fetch the selected subsets and check them. Returns {"fetched": [...], "skipped": [...], "checks": [...]}."""
    from tqdm import tqdm

    out_dir = Path(args.out_dir)
    remote = list_remote(args)
    selected: dict[str, list[str]] = {}
    for name in args.only:
        subset = SUBSETS[name]
        if "prefix" in subset:
            files = [p for p in remote if p.startswith(subset["prefix"])]
        else:
            files = subset["files"]
        missing = [p for p in files if p not in remote]
        if missing or not files:
            where = args.source or f"{args.repo_id}@{args.revision}"
            raise SystemExit(f"{where}: subset {name!r} lacks {missing or subset.get('prefix')}")
        selected[name] = files

    todo, skipped = [], []
    for files in selected.values():
        for repo_path in files:
            dest = out_dir / LOCAL_NAMES.get(repo_path, repo_path)
            complete = dest.exists() and dest.stat().st_size == remote[repo_path]
            (skipped if complete and not args.force else todo).append(repo_path)
    print(f"{args.source or args.repo_id}: {len(todo)} file(s) to fetch, {len(skipped)} already present -> {out_dir}")
    for repo_path in tqdm(todo, desc="fetch", unit="file", disable=not todo):
        fetch(args, repo_path, out_dir / LOCAL_NAMES.get(repo_path, repo_path))

    reports, failures = [], []
    for name, files in selected.items():
        paths = {rp: out_dir / LOCAL_NAMES.get(rp, rp) for rp in files}
        for check in SUBSETS[name]["checks"]:
            try:
                reports.append(run_check(check, paths))
                print(reports[-1])
            except ValueError as e:
                failures.append(f"{name}: {e}")
    if failures:
        hint = "" if args.force else " (files skipped as present can be fetched again with --force)"
        raise SystemExit("check failed" + hint + ":\n" + "\n".join(failures))
    print(f"done: fetched {len(todo)}, skipped {len(skipped)}, {len(reports)} checks passed")
    return {"fetched": todo, "skipped": skipped, "checks": reports}


if __name__ == "__main__":
    main(parse_args())
