"""GSM8K: grade-school word problems; the prediction is the last number in the response.

Two protocols (see evaluate_instruct.py), both scored on every run so one generation pass gives both numbers:

- improved: task text `data/gsm8k_question.prompt` (`{question}\\nAnswer:`) in the frame the model knows (the zero-shot
  conversation frame for a base model, the Alpaca training template for a model fine-tuned on it); prediction = the
  last number as people write it (`1,000`, `-3`, `2.50`), gold = the number after `####`, compared numerically.
- reference: the published protocol (REFERENCE.md): task text = the question alone (`data/question_only.prompt`) in
  the zero-shot frame; prediction = the last `\\d+` match of the response, gold = the last `\\d+` match of the whole
  `answer` field, correct iff the two strings are equal. So "1,000" -> "000", "2.50" -> "50", "-3" -> "3".
"""

from __future__ import annotations

import os
import re
from decimal import Decimal, InvalidOperation

from utils.benchmarks.base import Benchmark, check_protocol, mean, one_sample_each, scorer_metrics, select_examples
from utils.helper_fns import load_prompt
from utils.inference import Completion

GSM8K_PROMPT = "gsm8k_question"  # data/gsm8k_question.prompt: "{question}\nAnswer:" (no trailing newline)
QUESTION_ONLY_PROMPT = "question_only"  # data/question_only.prompt: "{question}", the published GSM8K task text
ZERO_SHOT_FRAME = "zero_shot_system_prompt"  # data/zero_shot_system_prompt.prompt, one {instruction} slot

# A number as people write it in prose. Read left to right:
# - a minus sign (ASCII or U+2212) only where a token starts: "-3", "x = -3", "(−2)"; after a letter, digit, "."
#   or "," it is a hyphen or an operator ("10-15", "COVID-19", "5-3=2") and the number is unsigned;
# - an integer with thousands separators ("1,000", "1,234,567"; each group exactly 3 digits, so "1,2,3" is three
#   numbers) or a plain digit run, or nothing before a decimal point (".5");
# - an optional decimal part that needs a digit after the point, so a sentence's final period is not taken ("18.").
# A currency sign or a percent sign is simply not part of the match ("$18" -> 18, "50%" -> 50).
NUMBER_RE = re.compile(r"(?:(?<![\w.,])[-\u2212])?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+)")


def to_decimal(number_text: str) -> Decimal:
    """The value of a NUMBER_RE match: separators dropped, U+2212 read as minus. `Decimal("2.50") == Decimal("2.5")`."""
    return Decimal(number_text.replace(",", "").replace("\u2212", "-"))


def format_number(value: Decimal) -> str:
    """Canonical text of a number: no exponent, no trailing zeros ("1000", "2.5", "-3")."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def parse_last_number(text: str) -> str | None:
    """The last number in `text` in canonical form (see `format_number`), or None when there is none.

    Examples: "It costs $18." -> "18"; "1,000 rolls" -> "1000"; "x = -3" -> "-3"; "2.50" -> "2.5"; "10-15" -> "15".
    """
    matches = NUMBER_RE.findall(text or "")
    if not matches:
        return None
    try:
        return format_number(to_decimal(matches[-1]))
    except InvalidOperation:  # cannot happen for NUMBER_RE matches; kept so a parser bug reads as unparsed, not a crash
        return None


REFERENCE_DIGITS_RE = re.compile(r"\d+")


def parse_reference_number(text: str) -> str | None:
    """The published GSM8K parser: the last run of digits in `text` as written, or None when there is none.

    It reads no sign, separator or decimal point: "1,000" -> "000", "2.50" -> "50", "-3" -> "3". The same function
    extracts the published gold answer from the dataset's whole `answer` field.
    """
    matches = REFERENCE_DIGITS_RE.findall(text or "")
    return matches[-1] if matches else None


def numbers_equal(prediction: str | None, gold: str) -> bool:
    """Numeric equality of two canonical number strings; a missing prediction is wrong."""
    if prediction is None:
        return False
    return Decimal(prediction) == Decimal(gold)


def parse_gold(answer: str, location: str) -> str:
    """The gold number of a GSM8K `answer` field: the text after its last `####`, as a canonical number string.

    Raises:
        ValueError: naming `location` when there is no `####` or no number after it.
    """
    if "####" not in answer:
        raise ValueError(f"{location}: the answer has no '####' followed by the final number: {answer[-80:]!r}")
    gold = parse_last_number(answer.rsplit("####", 1)[1])
    if gold is None:
        raise ValueError(f"{location}: no number after '####' in the answer: {answer[-80:]!r}")
    return gold



class GSM8KBenchmark(Benchmark):
    """GSM8K scored by both protocols' parsers; `prediction` and `correct` are the run's protocol's.

    A record holds `question`, `gold` (canonical number string, the improved gold), `gold_reference` (the published
    gold: last digit run of the `answer` field), `response`, `prediction` / `correct` (the run's protocol),
    `prediction_reference` / `correct_reference` and `prediction_improved` / `correct_improved` (both parsers on the
    same response), `response_tokens`, `finish_reason`.

    Args:
        frame_template: the text around the task, with one `{instruction}` slot; None = the zero-shot frame.
        task_template: the task text with a `{question}` slot; None = the protocol's (improved:
            data/gsm8k_question.prompt, reference: data/question_only.prompt).
        protocol: "improved" or "reference": which parser gives the headline `prediction` and `correct`.
    """

    name = "gsm8k"
    # The published settings, keyed like evaluate_instruct.py's flags (REFERENCE.md, "Evaluation protocol").
    scorers = {"reference": "last \\d+ match of the response == last \\d+ match of the answer field (strings)",
               "improved": "last number (separators, sign, decimals) == the number after ####, numerically"}
    reference_settings = {"task_prompt": "data/question_only.prompt", "max_tokens": 512, "max_model_len": 2048,
                          "max_num_seqs": 32}  # fmt: skip

    def __init__(self, frame_template: str | None = None, task_template: str | None = None,
                 protocol: str = "improved"):  # fmt: skip
        check_protocol(protocol)
        self.protocol = protocol
        default_task = QUESTION_ONLY_PROMPT if protocol == "reference" else GSM8K_PROMPT
        self.frame_template = load_prompt(ZERO_SHOT_FRAME) if frame_template is None else frame_template
        self.task_template = load_prompt(default_task) if task_template is None else task_template
        if "{instruction}" not in self.frame_template:
            raise ValueError("the frame template has no {instruction} slot")
        if "{question}" not in self.task_template:
            raise ValueError("the GSM8K task template has no {question} slot")

    def load_examples(self, path: str | os.PathLike, max_examples: int = -1) -> list[dict]:
        """Read GSM8K JSON Lines `{question, answer}`; every record is checked before anything is generated.

        Returns:
            `[{"index", "question", "gold", "gold_reference"}]`, the first `max_examples` (-1 = all).
        """
        examples = []
        for i, (location, rec) in enumerate(self.read_records(path)):
            question, answer = rec.get("question"), rec.get("answer")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{location}: 'question' must be a non-empty string; the record has keys "
                                 f"{sorted(rec)}")  # fmt: skip
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = f"#### {answer}"
            if not isinstance(answer, str):
                raise ValueError(f"{location}: 'answer' must be a string ending in '#### <number>', got {answer!r}")
            examples.append({"index": i, "question": question, "gold": parse_gold(answer, location),
                             "gold_reference": parse_reference_number(answer)})  # fmt: skip
        return select_examples(examples, max_examples)

    def build_prompt(self, example: dict) -> str:
        task = self.task_template.replace("{question}", example["question"])
        return self.frame_template.replace("{instruction}", task)

    def score(self, examples: list[dict], completions: list[list[Completion]]) -> list[dict]:
        records = []
        for ex, c in zip(examples, one_sample_each(self.name, examples, completions)):
            # Examples built by hand may lack the published gold; it is then read from the canonical one.
            gold_reference = ex.get("gold_reference") or parse_reference_number(ex["gold"])
            improved = parse_last_number(c.text)
            reference = parse_reference_number(c.text)
            scores = {
                "prediction_reference": reference,
                "correct_reference": reference is not None and reference == gold_reference,
                "prediction_improved": improved,
                "correct_improved": numbers_equal(improved, ex["gold"]),
            }
            records.append({
                "question": ex["question"],
                "gold": ex["gold"],
                "gold_reference": gold_reference,
                "response": c.text,
                "prediction": scores[f"prediction_{self.protocol}"],
                "correct": scores[f"correct_{self.protocol}"],
                **scores,
                "response_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
            })  # fmt: skip
        return records

    def summarize(self, records: list[dict]) -> dict:
        """accuracy = correct / examples (an unparsed response counts wrong); parsed_rate = responses with a number;
        both for the run's protocol, and per protocol's parser under `scorers` (same responses)."""
        return {
            "num_examples": len(records),
            "accuracy": mean([float(r["correct"]) for r in records]),
            "parsed_rate": mean([float(r["prediction"] is not None) for r in records]),
            "n_correct": sum(1 for r in records if r["correct"]),
            "n_unparsed": sum(1 for r in records if r["prediction"] is None),
            **scorer_metrics(records),
        }
