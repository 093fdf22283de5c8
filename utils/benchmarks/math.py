"""MATH with the r1_zero prompt: the model reasons after `<think>`, answers in `<answer> ... </answer>`, and the
r1_zero reward (utils/drgrpo_grader.py) grades format and answer.

The prompt file and the stop string are the ones training uses (`data/r1_zero.prompt`, `R1_ZERO_STOP`), so in-loop
validation and this benchmark score the same thing.
"""

from __future__ import annotations

import math
import os
from collections import Counter

from utils.benchmarks.base import Benchmark, mean, response_stats, select_examples
from utils.data_sources import load_records
from utils.dataloader import checked_problem_and_answer
from utils.helper_fns import load_prompt
from utils.inference import Completion

R1_ZERO_PROMPT = "r1_zero"  # data/r1_zero.prompt; ends with "Assistant: <think>" and no newline
R1_ZERO_STOP = ["</answer>"]  # kept in the output: the format reward needs the closing tag

PROBLEM_KEYS = ("problem", "question")
ANSWER_KEYS = ("expected_answer", "answer", "ground_truth")


def _first_key(record: dict, keys: tuple[str, ...], location: str) -> object:
    for k in keys:
        if k in record:
            return record[k]
    alternatives = f"'{keys[0]}'" + (f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else "")
    raise ValueError(f"{location}: missing key {alternatives}; the record has keys {sorted(record)}")


def load_math_examples(path: str | os.PathLike, max_examples: int = -1, split: str = "test",
                       config: str | None = None) -> list[dict]:
    """Read MATH problems from JSON Lines or a JSON array (the published MATH files are arrays despite `.jsonl`).

    `path` may also be a Parquet file or a hub dataset id (its `split` and `config`; `utils.data_sources`).
    Key aliases: problem = `problem` | `question`; answer = `expected_answer` | `answer` | `ground_truth` (a string,
    a number, or a list of acceptable answers). Every record is checked, so a bad one fails before any generation.

    Returns:
        `[{"index", "problem", "expected_answer"}]`, the first `max_examples` (-1 = all); `index` is the record's
        position in the file.

    Raises:
        ValueError: naming the file and line (JSONL) or index (array) and the missing key or bad value.
    """
    examples = []
    for i, (location, rec) in enumerate(load_records(path, split, config)):
        problem = _first_key(rec, PROBLEM_KEYS, location)
        answer = _first_key(rec, ANSWER_KEYS, location)
        answer = checked_problem_and_answer(location, problem, answer)
        examples.append({"index": i, "problem": problem, "expected_answer": answer})
    return select_examples(examples, max_examples)


def _answer_of(response: str, format_reward: float) -> str | None:
    """The graded answer text of a formatted response (None when unformatted), used to group majority votes."""
    if not format_reward:
        return None
    from utils.drgrpo_grader import extract_r1_zero_answer

    return extract_r1_zero_answer(response)[1] or None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, Codex paper)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)



class MathBenchmark(Benchmark):
    """MATH problems, r1_zero prompt, graded by `grade_batch` with `r1_zero_reward_fn`.

    A record holds the first sample's `response`, `answer` (graded text, None if unformatted), `format_reward`,
    `answer_reward`, `reward`, `response_tokens`, `finish_reason`, `grader_timed_out`; with n > 1 samples, `samples`
    lists all n in that shape.

    Args:
        prompt_template: prompt text with a `{question}` slot; None = data/r1_zero.prompt.
        grader_workers: grader processes (None = grade_batch's default).
        grader_timeout_s: seconds one answer may take to grade before it counts as wrong.
    """

    name = "math"

    def __init__(self, prompt_template: str | None = None, grader_workers: int | None = None,
                 grader_timeout_s: float = 5.0):  # fmt: skip
        self.prompt_template = load_prompt(R1_ZERO_PROMPT) if prompt_template is None else prompt_template
        if "{question}" not in self.prompt_template:
            raise ValueError("the prompt template has no {question} slot")
        self.grader_workers = grader_workers
        self.grader_timeout_s = grader_timeout_s

    def load_examples(self, path: str | os.PathLike, max_examples: int = -1) -> list[dict]:
        return load_math_examples(path, max_examples, self.data_split, self.data_config)

    def build_prompt(self, example: dict) -> str:
        # str.replace, not str.format: a template may hold literal braces (e.g. \\boxed{}); same as training's prompts
        return self.prompt_template.replace("{question}", example["problem"])

    def score(self, examples: list[dict], completions: list[list[Completion]] | list[Completion]) -> list[dict]:
        """Grade every sample in one `grade_batch` call.

        Args:
            examples: dicts with `problem` and `expected_answer` (as `load_examples` returns, or raw records).
            completions: per example, its n Completions (a bare Completion is taken as n = 1).

        Returns:
            one record per example (see the class docstring).
        """
        from utils.drgrpo_grader import grade_batch

        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completion lists")
        per_example = [[c] if isinstance(c, Completion) else list(c) for c in completions]
        responses = [c.text for cs in per_example for c in cs]
        truths = [ex["expected_answer"] for ex, cs in zip(examples, per_example) for _ in cs]
        grades = iter(grade_batch(responses, truths, workers=self.grader_workers, timeout_s=self.grader_timeout_s))
        records = []
        for ex, cs in zip(examples, per_example):
            samples = []
            for c in cs:
                g = next(grades)
                samples.append({
                    "response": c.text,
                    "answer": _answer_of(c.text, g["format_reward"]),
                    "format_reward": g["format_reward"],
                    "answer_reward": g["answer_reward"],
                    "reward": g["reward"],
                    "response_tokens": len(c.token_ids),
                    "finish_reason": c.finish_reason,
                    "grader_timed_out": bool(g.get("timed_out", False)),
                })  # fmt: skip
            rec = {"problem": ex["problem"], "expected_answer": ex["expected_answer"], **samples[0]}
            if len(samples) > 1:
                rec["samples"] = samples
            records.append(rec)
        return records

    def summarize(self, records: list[dict]) -> dict:
        """Metrics over all samples of all records.

        accuracy = mean reward; format_accuracy = mean format_reward; n_correct / n_formatted_wrong / n_unformatted =
        samples with format 1 & answer 1 / format 1 & answer 0 / format 0; mean response length (tokens) overall and
        for correct and incorrect samples; truncated_frac = share that hit max_tokens. With n > 1 samples per
        example: pass@k for k = 1, 2, 4, ... and n (unbiased estimator), and majority_accuracy (the most frequent
        graded answer string among formatted samples, ties to the earliest; equivalent answers written differently
        vote apart).
        """
        samples = [s for rec in records for s in rec.get("samples", [rec])]
        correct = [s for s in samples if s["reward"] == 1]
        incorrect = [s for s in samples if s["reward"] != 1]
        out = {
            "num_examples": len(records),
            "num_samples": len(samples),
            "accuracy": mean([s["reward"] for s in samples]),
            "format_accuracy": mean([s["format_reward"] for s in samples]),
            "n_correct": len(correct),
            "n_formatted_wrong": sum(1 for s in samples if s["format_reward"] == 1 and s["answer_reward"] != 1),
            "n_unformatted": sum(1 for s in samples if s["format_reward"] != 1),
            **response_stats(samples),  # also here: in-loop validation calls summarize without the runner
            "mean_response_tokens_correct": mean([s["response_tokens"] for s in correct]),
            "mean_response_tokens_incorrect": mean([s["response_tokens"] for s in incorrect]),
            "n_grader_timeouts": sum(1 for s in samples if s.get("grader_timed_out")),
        }
        n = min((len(rec.get("samples", [rec])) for rec in records), default=1)
        if n > 1:
            ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
            for k in ks:
                out[f"pass@{k}"] = mean([
                    pass_at_k(len(rec["samples"]), sum(s["reward"] == 1 for s in rec["samples"]), k) for rec in records
                ])  # fmt: skip
            out["majority_accuracy"] = mean([_majority_reward(rec["samples"]) for rec in records])
        return out


def _majority_reward(samples: list[dict]) -> float:
    """Reward of the most frequent answer among formatted samples (0 when none is formatted).

    Answers vote by the grader's normal form (`\\dfrac12` and `\\frac{1}{2}`, `1,000` and `1000` are one key), and
    keys the grader's fast stages prove equivalent (`0.5` and `\\frac{1}{2}`; no sympy, so no hang) vote together:
    each key joins the first earlier group whose first answer it equals. Ties go to the group seen first.
    """
    from utils.drgrpo_grader import fast_equivalent, normalize_answer

    keys = [normalize_answer(s["answer"]) if s["answer"] is not None else None for s in samples]
    group_of: dict[str, int] = {}  # normal form -> group id (ids in order of first appearance)
    heads: list[str] = []  # each group's first answer
    for s, key in zip(samples, keys):
        if key is None or key in group_of:
            continue
        match = next((g for g, head in enumerate(heads) if fast_equivalent(s["answer"], head)), None)
        if match is None:
            match = len(heads)
            heads.append(s["answer"])
        group_of[key] = match
    votes = Counter(group_of[k] for k in keys if k is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(s for s, k in zip(samples, keys) if k is not None and votes[group_of[k]] == top)  # earliest of ties
    return float(winner["reward"])
