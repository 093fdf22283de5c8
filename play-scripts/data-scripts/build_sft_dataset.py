"""Build the reasoning SFT set from teacher samples: keep finished ones, rewrite them into the r1_zero response format,
grade the answer against expected_answer by math equivalence, and write the full and the filtered (correct) sets.

    python play-scripts/data-scripts/build_sft_dataset.py --traces data/sft-reason/traces_gpt-oss-120b.jsonl
    python play-scripts/data-scripts/build_sft_dataset.py --traces data/sft-reason/sft_gpt-oss-120b.jsonl \\
        --output-full /tmp/published_full.jsonl --output-filtered /tmp/published_equiv.jsonl  # re-filter published set
    python play-scripts/data-scripts/build_sft_dataset.py --traces tests/fixtures/data/teacher_traces.jsonl \\
        --output-full /tmp/full.jsonl --output-filtered /tmp/filtered.jsonl               # smoke

Input: generate_traces.py records (`text`, `finish_reason`), or published records whose trace is in `reasoning_trace`
/ `response` (no finish reason: assumed finished, and counted). The published filtered set kept a trace only when its
answer string equalled the reference (`\\frac{1}{2}` vs `0.5` dropped); here utils.drgrpo_grader decides, and the
stats report how many traces exact string match would have kept.

The response is rewritten to ` REASONING </think> <answer> ANSWER </answer>`: the r1_zero prompt ends in
`Assistant: <think>`, so the training target starts inside the reasoning (leading space as in data/demo) and ends at
`</answer>` (no EOS, see REFERENCE.md). Accepted teacher shapes: `<think> R </think> <answer> A </answer>`, the same
without `<think>` (r1_zero completions), any spacing or newlines between the tags, a preamble before `<think>` and
text after `</answer>` (both cut). A sample is dropped, and counted by reason, when it did not finish
(`finish_reason` other than "stop"), is empty, has no `<answer>`, an unclosed one, an empty answer or reasoning, or
tags left inside the reasoning or answer. `--per-problem one` keeps the first correct sample of each problem.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.dataloader import KEY_ALIASES  # noqa: E402
from utils.drgrpo_grader import grade_batch  # noqa: E402
from utils.helper_fns import DATA_DIR, append_jsonl, load_records, write_json  # noqa: E402

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TEXT_KEYS = ("text",) + KEY_ALIASES["response"]  # raw teacher output first, then published traces


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", nargs="+", required=True, help="teacher sample files (JSON Lines or JSON array)")
    p.add_argument("--output-full", default=str(DATA_DIR / "sft-reason" / "sft_traces_full.jsonl"),
                   help="every finished, well-formed sample, correct or not")
    p.add_argument("--output-filtered", default=str(DATA_DIR / "sft-reason" / "sft_traces_filtered.jsonl"),
                   help="the correct samples")
    p.add_argument("--stats", default="", help="stats JSON ('' = --output-filtered with the suffix .stats.json)")
    p.add_argument("--per-problem", choices=["all", "one"], default="all",
                   help="correct samples kept per problem in the filtered set")
    p.add_argument("--workers", type=int, default=2, help="grader worker processes (utils.drgrpo_grader.grade_batch)")
    p.add_argument("--grade-timeout-s", type=float, default=5.0, help="seconds one answer may take to grade")
    return p.parse_args(argv)


def rewrite_r1_zero(text) -> tuple[str, str] | tuple[None, str]:
    """`(response, answer)` in the r1_zero format, or `(None, reason)` when the teacher output cannot be used."""
    if not isinstance(text, str) or not text.strip():
        return None, "empty_output"
    start = text.rfind("<answer>")
    if start < 0:
        return None, "no_answer_tag"
    end = text.find("</answer>", start)
    if end < 0:
        return None, "unclosed_answer"
    answer = text[start + len("<answer>") : end].strip()
    reasoning = text[:start]
    if "<think>" in reasoning:
        reasoning = reasoning.split("<think>", 1)[1]  # drop a preamble before the opening tag
    reasoning = reasoning.strip()
    if reasoning.endswith("</think>"):
        reasoning = reasoning[: -len("</think>")].strip()
    if any(tag in reasoning or tag in answer for tag in TAGS):
        return None, "stray_tags"
    if not answer:
        return None, "empty_answer"
    if not reasoning:
        return None, "empty_reasoning"
    return f" {reasoning} </think> <answer> {answer} </answer>", answer


def read_samples(paths: list[str]) -> list[dict]:
    """Samples with canonical keys; a record without a problem, answer or text key is an error naming `file:line`."""
    samples, per_problem = [], Counter()
    for path in paths:
        for loc, rec in load_records(path):
            row = {"source": loc}
            wanted = (("problem", KEY_ALIASES["problem"]), ("expected_answer", KEY_ALIASES["expected_answer"]),
                      ("text", TEXT_KEYS))  # fmt: skip
            for key, aliases in wanted:
                alias = next((a for a in aliases if a in rec), None)
                if alias is None:
                    raise SystemExit(f"{loc}: record has no {key!r} (accepted keys: {', '.join(aliases)})")
                row[key] = rec[alias]
            if not isinstance(row["problem"], str) or row["expected_answer"] is None:
                raise SystemExit(f"{loc}: 'problem' must be a string and the expected answer present")
            row["expected_answer"] = str(row["expected_answer"])
            row["problem_id"] = rec.get("problem_id") or hashlib.sha1(row["problem"].encode("utf-8")).hexdigest()[:16]
            row["sample_index"] = rec.get("sample_index", per_problem[row["problem_id"]])
            per_problem[row["problem_id"]] += 1
            row["finish_reason"] = rec["finish_reason"] if "finish_reason" in rec else "missing"
            if "teacher" in rec:
                row["teacher"] = rec["teacher"]
            samples.append(row)
    return samples


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    append_jsonl(tmp, records)
    os.replace(tmp, path)


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, before anything is read or written, an output that is an input or another output."""
    stats = args.stats or str(Path(args.output_filtered).with_suffix(".stats.json"))
    outputs = {"--output-full": args.output_full, "--output-filtered": args.output_filtered, "--stats": stats}
    seen: dict[Path, str] = {}
    for flag, out in outputs.items():
        resolved = Path(out).resolve()
        if resolved in seen:
            raise SystemExit(f"{flag} {out}: the same file as {seen[resolved]}; give each output its own path")
        seen[resolved] = flag
        for trace in args.traces:
            if resolved == Path(trace).resolve():
                raise SystemExit(f"{flag} {out} is an input (--traces {trace}): writing it would replace the raw "
                                 f"traces; choose another output path")  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    """Build both sets; returns the stats that are printed and saved."""
    from tqdm import tqdm

    check_paths(args)
    samples = read_samples(args.traces)
    dropped, usable = Counter(), []
    for s in tqdm(samples, desc="parse", disable=len(samples) < 10_000):
        if s["finish_reason"] not in ("stop", "missing"):  # "length": cut off mid-reasoning
            dropped[f"finish_reason={s['finish_reason']}"] += 1
            continue
        response, answer_or_reason = rewrite_r1_zero(s["text"])
        if response is None:
            dropped[answer_or_reason] += 1
            continue
        usable.append({**s, "reasoning_trace": response, "extracted_answer": answer_or_reason})

    print(f"grading {len(usable):,} answers ({args.workers} workers, {args.grade_timeout_s:g} s limit per answer)")
    grades = grade_batch([u["reasoning_trace"] for u in usable], [u["expected_answer"] for u in usable],
                         workers=args.workers, timeout_s=args.grade_timeout_s)  # fmt: skip
    # --per-problem one keeps the lowest sample index among a problem's correct samples.
    first_correct: dict[str, int] = {}
    for u, g in zip(usable, grades):
        if g["answer_reward"] == 1.0:
            pid = u["problem_id"]
            first_correct[pid] = min(u["sample_index"], first_correct.get(pid, u["sample_index"]))
    full, filtered, taken = [], [], set()
    filter_dropped = Counter()
    exact = 0
    for u, g in zip(usable, grades):
        if g["format_reward"] != 1.0:  # cannot happen for a rewritten response; kept as a guard on the grader contract
            dropped["grader_format_reject"] += 1
            continue
        correct = g["answer_reward"] == 1.0
        exact += u["extracted_answer"].strip() == u["expected_answer"].strip()
        record = {"problem": u["problem"], "reasoning_trace": u["reasoning_trace"],
                  "expected_answer": u["expected_answer"], "extracted_answer": u["extracted_answer"],
                  "correct": correct, "problem_id": u["problem_id"], "sample_index": u["sample_index"],
                  "source": u["source"]}  # fmt: skip
        if "teacher" in u:
            record["teacher"] = u["teacher"]
        full.append(record)
        if not correct:
            filter_dropped["grade_timeout" if g["timed_out"] else "incorrect"] += 1
        elif args.per_problem == "one" and (u["problem_id"] in taken
                                            or u["sample_index"] != first_correct[u["problem_id"]]):
            filter_dropped["extra_correct_sample"] += 1
        else:
            filtered.append(record)
            taken.add(u["problem_id"])

    write_jsonl_atomic(Path(args.output_full), full)
    write_jsonl_atomic(Path(args.output_filtered), filtered)
    stats = {
        "samples": len(samples),
        "problems": len({s["problem_id"] for s in samples}),
        "problems_solved": len(first_correct),
        "kept_full": len(full),
        "kept_filtered": len(filtered),
        "dropped": dict(sorted(dropped.items())),
        "dropped_from_filtered": dict(sorted(filter_dropped.items())),
        "finish_reason_missing_assumed_finished": sum(s["finish_reason"] == "missing" for s in samples),
        "exact_string_match": exact,
        "per_problem": args.per_problem,
    }
    write_json(args.stats or Path(args.output_filtered).with_suffix(".stats.json"), stats)
    reasons = ", ".join(f"{k} {v}" for k, v in {**stats["dropped"], **stats["dropped_from_filtered"]}.items()) or "none"
    print(f"kept {len(filtered):,} correct of {len(samples):,} samples (full set {len(full):,}; "
          f"{len(first_correct):,}/{stats['problems']:,} problems solved) | dropped: {reasons} | "
          f"exact string match would call {exact:,} correct")  # fmt: skip
    if stats["finish_reason_missing_assumed_finished"]:
        print(f"{stats['finish_reason_missing_assumed_finished']:,} samples had no finish_reason (published format): "
              "assumed finished")  # fmt: skip
    print(f"wrote {args.output_full} and {args.output_filtered}")
    return stats


if __name__ == "__main__":
    main(parse_args())
