"""Reasoning-SFT records: load and validate, turn into (prompt, response) pairs, drop over-long ones, batch.

A record is a JSON object with a problem (`problem` or `question`), a response (`reasoning_trace` or `response`)
and a gold answer (`expected_answer`, `answer` or `ground_truth`). Sources are JSON Lines or JSON array files,
Parquet files, or hub datasets (`utils.data_sources`).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from utils.data_sources import load_records
from utils.post_train import tokenize_prompt_and_output

KEY_ALIASES = {
    "problem": ("problem", "question"),
    "response": ("reasoning_trace", "response"),
    "expected_answer": ("expected_answer", "answer", "ground_truth"),
}


def checked_problem_and_answer(location: str, problem, answer):
    """The one rule for a reasoning record's problem and gold answer, in training, in-loop validation and
    evaluate_reason.py alike: the problem a non-empty string; the answer a string, a number (turned into its string)
    or a non-empty list of acceptable strings. Returns the answer; ValueError naming `location` otherwise."""
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{location}: the problem must be a non-empty string, got {problem!r}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    valid_list = isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)
    if not (isinstance(answer, str) or valid_list):
        raise ValueError(f"{location}: the answer must be a string or a list of strings, got {answer!r}")
    return answer


def load_reason_records(path: str | Path, require_response: bool = True, split: str = "train",
                        config: str | None = None) -> list[dict]:
    """Load records with canonical keys `problem`, `expected_answer` and (when required) `response` from a file or
    a hub dataset's `split` (and `config`), see `utils.data_sources.load_records`.

    Raises:
        ValueError: naming `file:line` (or `file[index]`, or the hub split and row) and the missing key, for the first
            bad record.
    """
    needed = ["problem", "expected_answer"] + (["response"] if require_response else [])
    out = []
    for loc, rec in load_records(path, split, config):
        row = {"source": loc}
        for key in KEY_ALIASES:
            alias = next((a for a in KEY_ALIASES[key] if a in rec), None)
            if alias is None:
                if key in needed:
                    raise ValueError(f"{loc}: record has no {key!r} (accepted keys: {', '.join(KEY_ALIASES[key])})")
                continue
            row[key] = rec[alias]
        row["expected_answer"] = checked_problem_and_answer(loc, row["problem"], row["expected_answer"])
        if "response" in row and (require_response or row["response"] is not None):
            if not isinstance(row["response"], str) or not row["response"].strip():
                raise ValueError(f"{loc}: the response must be a non-empty string, got {row['response']!r}")
        out.append(row)
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def format_prompts(records: list[dict], template: str) -> list[str]:
    """Fill the `{question}` slot of the template (e.g. r1_zero) with each problem."""
    return [template.replace("{question}", r["problem"]) for r in records]


def select_examples(records: list[dict], num_examples: int, seed: int) -> list[dict]:
    """The first `num_examples` records after a seeded shuffle (-1 = all, shuffled), for dataset-size sweeps."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if num_examples > len(records):
        raise ValueError(f"--num-examples {num_examples} > {len(records)} records available")
    if num_examples >= 0:
        order = order[:num_examples]
    return [records[i] for i in order]


def drop_overlong(
    prompts: list[str], responses: list[str], tokenizer, max_seq_len: int
) -> tuple[list[int], list[int]]:
    """Indices of pairs whose prompt+response fits `max_seq_len` tokens, and their lengths; over-long ones are dropped
    (never truncated mid-answer). The caller reports `len(prompts) - len(kept)`."""
    p_len = [len(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    r_len = [len(x) for x in tokenizer(responses, add_special_tokens=False)["input_ids"]]
    kept = [i for i in range(len(prompts)) if p_len[i] + r_len[i] <= max_seq_len]
    return kept, [p_len[i] + r_len[i] for i in kept]


def make_micro_batches(
    prompts: list[str], responses: list[str], indices: list[int], micro_batch_size: int, tokenizer
) -> list[dict[str, torch.Tensor]]:
    """Split `indices` into padded micro-batches of `micro_batch_size` (the last may be smaller)."""
    out = []
    for s in range(0, len(indices), micro_batch_size):
        idx = indices[s : s + micro_batch_size]
        out.append(tokenize_prompt_and_output([prompts[i] for i in idx], [responses[i] for i in idx], tokenizer))
    return out
