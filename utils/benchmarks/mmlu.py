"""MMLU: four-option multiple choice over 57 subjects; the model is asked for "The correct answer is _".

Data: a folder of per-subject CSV files without a header, named `<subject>_test.csv` (searched recursively, so the
published `mmlu/` folder with `test/`, `dev/`, `val/` inside works as well as a flat folder of test files); each row is
question, A, B, C, D, answer letter; subjects in sorted order. The task text is `data/mmlu_question.prompt` placed in a
frame (zero-shot conversation frame or the Alpaca training template, see evaluate_instruct.py).

Both protocols' parsers score every response (`parse_mmlu_letter`, improved: an explicit statement first;
`parse_reference_mmlu_letter`, the published one: the first standalone capital letter after upper-casing).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from utils.benchmarks.base import Benchmark, check_protocol, mean, one_sample_each, scorer_metrics, select_examples
from utils.helper_fns import load_prompt
from utils.inference import Completion

MMLU_PROMPT = "mmlu_question"  # data/mmlu_question.prompt: {subject} {question} {options[0..3]}, ends "Answer:\n"
ZERO_SHOT_FRAME = "zero_shot_system_prompt"
LETTERS = ("A", "B", "C", "D")

# The four categories of the MMLU paper (Hendrycks et al. 2021), each subject in exactly one. The grouping follows the
# paper's subject table: STEM = math, physics, chemistry, biology, computer science, engineering; humanities = history,
# philosophy, law; social sciences = economics, politics, geography, psychology, culture; other = business, health,
# and the remaining general-knowledge subjects.
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}  # fmt: skip
SUBJECT_CATEGORY: dict[str, str] = {s: cat for cat, subjects in MMLU_CATEGORIES.items() for s in subjects}

# --- answer parser ---------------------------------------------------------------------------------------------------
# 1. An explicit statement wins: "answer is B", "answer: (C)", "answer would be **D**", "answer is option A". The letter
#    must not run into a word or number, so "The correct answer is 10000 polyomaviruses." states no letter. A lower-case
#    letter counts too ("The correct answer is b." -> B), except an "a" that a word follows: "the answer is a mammal"
#    is the article. The first statement is taken: the prompt asks for one sentence, and text after it is the model
#    running on.
_EXPLICIT = re.compile(
    r"(?i:answer)(?:\s+(?i:is|would\s+be|should\s+be|will\s+be|must\s+be))?\s*[:=]?\s*"
    r"(?:(?i:option|choice|letter)\s+)?[(\[*\"'`]*([A-Da-d])(?![A-Za-z0-9])"
)
_WORD_AFTER = re.compile(r"\s+[A-Za-z]")
# 2. Without one, a letter counts only where it is written as an option label: "(B)", "B." / "B)" / "B:" opening a
#    line, "option B", "B is correct", or a response that is just the letter. A bare "A" in running text ("A good
#    way to see it...") is the article, never an answer. When the labels name different letters, the response is
#    ambiguous (e.g. it lists the options) and gets None.
_LABELS = (
    re.compile(r"\(([A-D])\)"),
    re.compile(r"(?m)^[\s*`\"']*([A-D])[.):](?=[\s*`\"']|$)"),  # at a line start: "Vitamin D." is not a label
    re.compile(r"(?i:option|choice|letter)\s+([A-D])(?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z0-9])([A-D])\s+(?i:is\s+(?:the\s+)?(?:correct|right|best))"),
)
_BARE_LETTER = re.compile(r"^[\s(\[*\"'`]*([A-D])[\s)\]*\"'`.]*$")


def parse_mmlu_letter(text: str) -> str | None:
    """The option letter a response chooses ("A".."D"), or None when it states none or is ambiguous (improved).

    "The correct answer is B. Because ..." -> "B"; "A common mistake... the correct answer is C" -> "C";
    "The correct answer is b." -> "B"; "The correct answer is 10000 polyomaviruses." -> None; "(D)" -> "D";
    "A. 4\\nB. 5" -> None (two labels).
    """
    text = text or ""
    for m in _EXPLICIT.finditer(text):
        if m.group(1) == "a" and _WORD_AFTER.match(text, m.end()):
            continue  # "the answer is a mammal"
        return m.group(1).upper()
    m = _BARE_LETTER.match(text)
    if m:
        return m.group(1)
    found = {m.group(1) for pattern in _LABELS for m in pattern.finditer(text)}
    return found.pop() if len(found) == 1 else None


# The published parser (REFERENCE.md): upper-case and strip the response, then the first of these that matches, in
# order. The second one takes the first standalone letter A-D anywhere, so "A quick check: the correct answer is B"
# -> "A", and "The correct answer is 10000 polyomaviruses." has no letter; the later ones only catch letters glued
# to a word ("ANSWERB", "OPTION:C").
REFERENCE_PATTERNS = tuple(re.compile(p) for p in (
    r"^([ABCD])$", r"\b([ABCD])\b", r"ANSWER[:： ]*([ABCD])", r"OPTION[:： ]*([ABCD])", r"CHOICE[:： ]*([ABCD])",
    r"\(([ABCD])\)",
))  # fmt: skip


def parse_reference_mmlu_letter(text: str) -> str | None:
    """The published MMLU parser: group 1 of the first pattern in REFERENCE_PATTERNS that matches the upper-cased,
    stripped response, or None (unparsed)."""
    upper = (text or "").upper().strip()
    for pattern in REFERENCE_PATTERNS:
        m = pattern.search(upper)
        if m:
            return m.group(1)
    return None


def subject_of(path: Path) -> str:
    """`abstract_algebra_test.csv` -> `abstract_algebra`."""
    return path.name.removesuffix(".csv").removesuffix("_test")



class MMLUBenchmark(Benchmark):
    """MMLU scored by both protocols' letter parsers; `prediction` and `correct` are the run's protocol's.

    A record holds `subject`, `category` (None for a subject outside the 57), `question`, `options`, `gold`,
    `response`, `prediction` (letter or None), `correct`, `prediction_reference` / `correct_reference` and
    `prediction_improved` / `correct_improved` (both parsers on the same response), `response_tokens`,
    `finish_reason`.

    Args:
        frame_template: the text around the task, with one `{instruction}` slot; None = the zero-shot frame.
        task_template: the task text (`{subject}`, `{question}`, `{options[0]}`..`{options[3]}`); None =
            data/mmlu_question.prompt (both protocols).
        protocol: "improved" or "reference": which parser gives the headline `prediction` and `correct`.
    """

    name = "mmlu"
    # The published settings, keyed like evaluate_instruct.py's flags (REFERENCE.md, "Evaluation protocol").
    scorers = {"reference": "upper+strip; first match of ^[ABCD]$, \\b[ABCD]\\b, ANSWER/OPTION/CHOICE[:： ]*X, (X)",
               "improved": "explicit 'answer is X' first (lower case too), else one unambiguous option label"}
    reference_settings = {"task_prompt": "data/mmlu_question.prompt", "max_tokens": 128, "max_model_len": 2048,
                          "max_num_seqs": 64}  # fmt: skip

    def __init__(self, frame_template: str | None = None, task_template: str | None = None,
                 protocol: str = "improved"):  # fmt: skip
        check_protocol(protocol)
        self.protocol = protocol
        self.frame_template = load_prompt(ZERO_SHOT_FRAME) if frame_template is None else frame_template
        self.task_template = load_prompt(MMLU_PROMPT) if task_template is None else task_template
        if "{instruction}" not in self.frame_template:
            raise ValueError("the frame template has no {instruction} slot")
        missing = [s for s in ("{question}", "{options[0]}", "{options[3]}") if s not in self.task_template]
        if missing:
            raise ValueError(f"the MMLU task template lacks {missing}")

    def load_examples(self, path: str | os.PathLike, max_examples: int = -1) -> list[dict]:
        """Read every `<subject>_test.csv` under the folder `path`, subjects in alphabetical order.

        Returns:
            `[{"index", "subject", "category", "question", "options", "gold"}]`, the first `max_examples` (-1 = all);
            `index` runs over the subjects in that order, so it is stable for a given folder.

        Raises:
            FileNotFoundError / ValueError: no test files, a subject twice, or a row that is not 6 fields with an
            answer in A-D (naming file and row).
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a folder (MMLU reads a folder of <subject>_test.csv files)")
        files = sorted(root.rglob("*_test.csv"), key=lambda p: subject_of(p))
        if not files:
            raise FileNotFoundError(f"{root}: no <subject>_test.csv files in this folder or below")
        subjects = [subject_of(p) for p in files]
        twice = sorted({s for s in subjects if subjects.count(s) > 1})
        if twice:
            raise ValueError(f"{root}: subjects found in more than one file: {twice}")
        unknown = [s for s in subjects if s not in SUBJECT_CATEGORY]
        if unknown:
            print(f"mmlu: {len(unknown)} subject(s) outside the 57 of MMLU_CATEGORIES, left out of per_category: "
                  f"{unknown}")  # fmt: skip
        examples = []
        for file, subject in zip(files, subjects):
            with open(file, newline="", encoding="utf-8") as f:
                for row_no, row in enumerate(csv.reader(f), start=1):
                    if not row:
                        continue
                    if len(row) != 6:
                        raise ValueError(f"{file}:{row_no}: expected 6 fields (question, A, B, C, D, answer), "
                                         f"got {len(row)}")  # fmt: skip
                    gold = row[5].strip()
                    if gold not in LETTERS:
                        raise ValueError(f"{file}:{row_no}: answer must be one of A-D, got {row[5]!r}")
                    examples.append({"index": len(examples), "subject": subject,
                                     "category": SUBJECT_CATEGORY.get(subject), "question": row[0],
                                     "options": row[1:5], "gold": gold})  # fmt: skip
        return select_examples(examples, max_examples)

    def build_prompt(self, example: dict) -> str:
        task = self.task_template.replace("{subject}", example["subject"].replace("_", " "))
        task = task.replace("{question}", example["question"])
        for i, option in enumerate(example["options"]):
            task = task.replace(f"{{options[{i}]}}", option)
        return self.frame_template.replace("{instruction}", task)

    def score(self, examples: list[dict], completions: list[list[Completion]]) -> list[dict]:
        records = []
        for ex, c in zip(examples, one_sample_each(self.name, examples, completions)):
            scores = {"prediction_reference": parse_reference_mmlu_letter(c.text),
                      "prediction_improved": parse_mmlu_letter(c.text)}  # fmt: skip
            for p in ("reference", "improved"):
                scores[f"correct_{p}"] = scores[f"prediction_{p}"] == ex["gold"]
            records.append({
                "subject": ex["subject"],
                "category": ex["category"],
                "question": ex["question"],
                "options": ex["options"],
                "gold": ex["gold"],
                "response": c.text,
                "prediction": scores[f"prediction_{self.protocol}"],
                "correct": scores[f"correct_{self.protocol}"],
                **scores,
                "response_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
            })  # fmt: skip
        return records

    def summarize(self, records: list[dict]) -> dict:
        """accuracy over all questions (an unparsed response counts wrong), parsed_rate, per-subject and per-category
        accuracy (both over questions, so a category's number weighs its subjects by size, as the overall one does),
        and macro_accuracy = the unweighted mean of the per-subject accuracies; all for the run's protocol, and
        accuracy / parsed_rate per protocol's parser under `scorers` (same responses)."""
        by_subject: dict[str, list[float]] = {}
        by_category: dict[str, list[float]] = {}
        for r in records:
            by_subject.setdefault(r["subject"], []).append(float(r["correct"]))
            if r["category"] is not None:
                by_category.setdefault(r["category"], []).append(float(r["correct"]))
        per_subject = {s: mean(v) for s, v in sorted(by_subject.items())}
        return {
            "num_examples": len(records),
            "accuracy": mean([float(r["correct"]) for r in records]),
            "parsed_rate": mean([float(r["prediction"] is not None) for r in records]),
            "n_correct": sum(1 for r in records if r["correct"]),
            "n_unparsed": sum(1 for r in records if r["prediction"] is None),
            "macro_accuracy": mean(list(per_subject.values())),
            "per_subject": per_subject,
            "per_category": {c: mean(by_category[c]) for c in MMLU_CATEGORIES if c in by_category},
            "per_category_count": {c: len(by_category[c]) for c in MMLU_CATEGORIES if c in by_category},
            **scorer_metrics(records),
        }
