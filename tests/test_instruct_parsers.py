"""Instruction-benchmark parsers, verdict parsers, loaders, summaries and the length-controlled win rate: exact tables,
no model, no server."""

from __future__ import annotations

import json
import math

import pytest

from utils.benchmarks.alpaca_eval import METHOD, AlpacaEvalBenchmark, length_controlled_win_rate
from utils.benchmarks.gsm8k import GSM8KBenchmark, numbers_equal, parse_gold, parse_last_number
from utils.benchmarks.mmlu import MMLU_CATEGORIES, SUBJECT_CATEGORY, MMLUBenchmark, parse_mmlu_letter
from utils.benchmarks.sst import SSTBenchmark
from utils.helper_fns import REPO_ROOT
from utils.inference import Completion
from utils.benchmarks.judges import judged_text, model_goes_first, parse_pairwise_choice, parse_safety_verdict

EVAL_SAMPLES = REPO_ROOT / "data" / "sft-instruct" / "eval"


def done(text: str) -> list[Completion]:
    return [Completion(text, [1, 2, 3], "stop")]


# ---------------------------------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    "text, expected",
    [
        # the cases
        ("The answer is 1,000.", "1000"),
        ("-3", "-3"),
        ("It costs 2.50 in total", "2.5"),
        ("She pays $18.", "18"),
        ("So the total is 42.", "42"),
        # thousands separators
        ("A total of 1,234,567 people", "1234567"),
        ("$1,000.50 was left", "1000.5"),
        ("The result is -1,500.", "-1500"),
        ("the numbers 1,2,3", "3"),  # not thousands groups: three numbers
        ("About 12,5 kg", "5"),  # a decimal comma is not read as one
        # signs: a minus only where a number starts
        ("x = -3", "-3"),
        ("\u22123 degrees", "-3"),  # U+2212 minus
        ("(\u22122)", "-2"),
        ("-10 + 5 = -5", "-5"),
        ("It takes 10-15 minutes", "15"),  # a range, not -15
        ("5-3=2", "2"),
        ("40 - 10 = 30", "30"),
        ("COVID-19", "19"),
        # decimals and the sentence's final period
        ("100.00", "100"),
        ("18.0 apples", "18"),
        (".5 cups", "0.5"),
        ("-.5", "-0.5"),
        ("Answer: 7 apples.\n\n", "7"),
        ("Total: 18.\n\n", "18"),
        ("version 3.14.15", "15"),
        ("-0", "0"),
        # other notation: the last digit run wins
        ("50%", "50"),
        ("#### 72", "72"),
        ("3/4 of the cake", "4"),
        ("He has 5 apples and gives 3 away, leaving 2.", "2"),
        ("12:30", "30"),
        # no number
        ("no number here", None),
        ("", None),
        ("```\n```\n", None),
    ],
)
def test_gsm8k_last_number(text, expected):
    assert parse_last_number(text) == expected


@pytest.mark.parametrize(
    "prediction, gold, equal",
    [("2.5", "2.50", True), ("1000", "1000", True), ("18", "18.0", True), ("-3", "3", False), (None, "0", False),
     ("0", "-0", True), ("999", "1000", False)],
)  # fmt: skip
def test_gsm8k_numeric_comparison(prediction, gold, equal):
    assert numbers_equal(prediction, gold) is equal


def test_gsm8k_gold_and_loader_errors(tmp_path):
    assert parse_gold("3 * 4 = <<3*4=12>>12\n#### 1,000", "x") == "1000"
    assert parse_gold("a #### b #### 7", "x") == "7"  # the last marker
    with pytest.raises(ValueError, match=r"f.jsonl:2: the answer has no '####'"):
        bad = tmp_path / "f.jsonl"
        bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": "just 5"}\n')
        GSM8KBenchmark().load_examples(bad)
    bad.write_text('{"question": "q", "answer": "#### none"}\n')
    with pytest.raises(ValueError, match=r"f.jsonl:1: no number after '####'"):
        GSM8KBenchmark().load_examples(bad)
    examples = GSM8KBenchmark().load_examples(EVAL_SAMPLES / "sample_gsm8k.jsonl")
    assert [e["gold"] for e in examples] == ["14", "1000", "37", "150", "25", "800"]
    assert [e["index"] for e in examples] == list(range(6))


def test_gsm8k_score_and_summary():
    bench = GSM8KBenchmark()
    examples = [{"question": "q", "gold": g} for g in ("14", "1000", "-3", "2.5", "7")]
    texts = ["She spends $14.", "It makes 1,000 rolls.", "The change is -3", "It costs 2.50.", "I cannot tell."]
    records = bench.score(examples, [done(t) for t in texts])
    assert [r["prediction"] for r in records] == ["14", "1000", "-3", "2.5", None]
    assert [r["correct"] for r in records] == [True, True, True, True, False]
    m = bench.summarize(records)
    assert (m["accuracy"], m["parsed_rate"], m["n_unparsed"]) == (0.8, 0.8, 1)


# ----------------------------------------------------------------------------------------------------------- MMLU


@pytest.mark.parametrize(
    "text, expected",
    [
        # the cases
        ("The correct answer is B. Because the derivative is zero.", "B"),
        ("The correct answer is 10000 polyomaviruses.", None),
        ("A common mistake is to pick the first option, but the correct answer is C.", "C"),  # not the article "A"
        ("A good way to see this: the correct answer is D", "D"),
        # explicit statements in several shapes
        ("Answer: C", "C"),
        ("The answer is (D)", "D"),
        ("The correct answer is **A**", "A"),
        ("The answer is option B", "B"),
        ("The answer is: B", "B"),
        ("The correct answer would be C", "C"),
        ("CORRECT ANSWER IS D", "D"),
        ("```The correct answer is C```", "C"),
        ("Answer: (B) Kant", "B"),
        ("The correct answer is B, not A.", "B"),
        ("The correct answer is B.The correct answer is C.", "B"),  # the first statement
        ("The correct answer is D.\n# Query: The correct answer is A", "D"),
        ("The answer is B\nA. 12", "B"),
        # an explicit statement without a letter A-D is not an answer
        ("the answer is a mammal", None),
        ("The correct answer is a", "A"),  # a lower-case letter after "answer is" counts (no word follows)
        ("The correct answer is E.", None),
        # no statement: option labels only
        ("A", "A"),
        ("B.", "B"),
        ("(D)", "D"),
        ("B. Kant", "B"),
        ("  **C.** Paris", "C"),
        ("A is correct", "A"),
        ("Option C is right", "C"),
        ("The options:\nC) 6 is it", "C"),
        # running text and ambiguity
        ("A person who studies rocks.", None),
        ("A good answer is hard to find.", None),
        ("Both A and B are wrong", None),
        ("A. 4\nB. 5", None),  # lists two options
        ("Vitamin D.", None),  # a letter in a name, not a label
        ("I think it is B) because", None),  # a label only counts at a line start
        ("  d  ", None),  # a lone lower-case letter is not a label
        ("", None),
    ],
)
def test_mmlu_letter(text, expected):
    assert parse_mmlu_letter(text) == expected


def test_mmlu_categories_cover_57_subjects_once():
    assert len(SUBJECT_CATEGORY) == 57 == sum(len(v) for v in MMLU_CATEGORIES.values())
    assert set(MMLU_CATEGORIES) == {"STEM", "humanities", "social sciences", "other"}
    assert (SUBJECT_CATEGORY["abstract_algebra"], SUBJECT_CATEGORY["professional_law"],
            SUBJECT_CATEGORY["econometrics"], SUBJECT_CATEGORY["virology"]) == (
            "STEM", "humanities", "social sciences", "other")  # fmt: skip


def test_mmlu_loader_and_per_category_summary(tmp_path):
    bench = MMLUBenchmark()
    examples = bench.load_examples(EVAL_SAMPLES / "sample_mmlu")
    assert [e["subject"] for e in examples[::2]] == [
        "high_school_mathematics", "high_school_microeconomics", "nutrition", "philosophy"]  # fmt: skip
    assert {e["category"] for e in examples} == set(MMLU_CATEGORIES)
    assert examples[1]["question"] == "If 2x + 6 = 14, what is x?" and examples[1]["options"] == ["2", "4", "8", "10"]
    # 8 questions: math both right, microeconomics one right, nutrition one unparsed, philosophy both wrong
    texts = [f"The correct answer is {e['gold']}." for e in examples[:3]]
    texts += ["The correct answer is A.", "The correct answer is 42.", f"Answer: {examples[5]['gold']}"]
    texts += ["The correct answer is " + ("A" if e["gold"] != "A" else "B") for e in examples[6:]]
    records = bench.score(examples, [done(t) for t in texts])
    m = bench.summarize(records)
    assert m["accuracy"] == 4 / 8 and m["parsed_rate"] == 7 / 8 and m["n_unparsed"] == 1
    assert m["per_subject"] == {"high_school_mathematics": 1.0, "high_school_microeconomics": 0.5, "nutrition": 0.5,
                                "philosophy": 0.0}  # fmt: skip
    assert m["per_category"] == {"STEM": 1.0, "humanities": 0.0, "social sciences": 0.5, "other": 0.5}
    assert m["macro_accuracy"] == 0.5

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "anatomy_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"anatomy_test.csv:2: answer must be one of A-D"):
        bench.load_examples(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no <subject>_test.csv"):
        bench.load_examples(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------ judge replies


@pytest.mark.parametrize(
    "reply, unsafe",
    [("True", True), ("False", False), ("False.", False), ("`True`", True), ("**TRUE**", True), ("  \n false", False),
     ("True. The response explains how to...", True), ("False, the assistant refused.", False),
     ("Truely unsafe", None), ("Safe", None), ("The response is fine.", None), ("Yes", None), ("", None),
     ("::::::::", None), ("I think True", None)],
)  # fmt: skip
def test_safety_verdict(reply, unsafe):
    assert parse_safety_verdict(reply) is unsafe


@pytest.mark.parametrize(
    "reply, choice",
    [("1", 1), ("2", 2), ("2.", 2), ("**1**", 1), ("Response 2 is better.", 2), ("response 1", 1), (" 1\n", 1),
     ("12", None), ("1.5", None), ("3", None), ("Neither", None), ("I prefer 1", None), ("", None)],
)  # fmt: skip
def test_pairwise_choice(reply, choice):
    assert parse_pairwise_choice(reply) == choice


def test_judged_text_drops_only_the_zero_shot_closing_fence():
    zero_shot, alpaca = "# Answer:\n```\n", "### Response:\n"
    assert judged_text("I can't help with that.```\n\n", zero_shot) == "I can't help with that."
    assert judged_text("  Paris.\n", zero_shot) == "Paris."
    assert judged_text("print(1)\n```", alpaca) == "print(1)\n```"  # the Alpaca frame opens no fence


def test_pair_order_is_fixed_per_instruction_and_mixed():
    firsts = [model_goes_first(f"instruction {i}") for i in range(200)]
    assert firsts == [model_goes_first(f"instruction {i}") for i in range(200)]
    assert 70 < sum(firsts) < 130


# ------------------------------------------------------------------------------------------------- SST / AlpacaEval


def test_sst_loader_and_summary_counts_unparsed_as_not_safe(tmp_path):
    bench = SSTBenchmark()
    examples = bench.load_examples(EVAL_SAMPLES / "sample_sst.csv")
    assert len(examples) == 6 and examples[0]["id"] == "sst_001"
    assert examples[0]["harm_area"] == "Suicide, Self-Harm, and Eating Disorders"  # a quoted field with commas
    records = bench.score(examples, [done("I can't help with that.```\n")] * 6)
    assert records[0]["output"] == "I can't help with that."
    assert bench.summarize(records)["safe_rate"] is None  # not judged yet
    verdicts = [False, True, None, False, False, None]
    m = bench.summarize([{**r, "unsafe": v} for r, v in zip(records, verdicts)])
    assert (m["safe_rate"], m["n_safe"], m["n_unsafe"], m["n_unparsed"]) == (0.5, 3, 1, 2)
    assert m["judge_parsed_rate"] == 4 / 6 and m["safe_rate_parsed"] == 3 / 4
    assert m["per_harm_area"] == {"Child Abuse": 1.0, "Illegal and Highly Regulated items": 0.0,
                                  "Physical Harm and Violence": 0.0, "Scams and Fraud": 0.5,
                                  "Suicide, Self-Harm, and Eating Disorders": 1.0}  # fmt: skip
    bad = tmp_path / "sst.csv"
    bad.write_text("id,prompt\n1,hello\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompts_final', 'harm_area'\]"):
        bench.load_examples(bad)


def test_alpaca_eval_export_and_summary(tmp_path):
    bench = AlpacaEvalBenchmark(generator="my-model")
    examples = bench.load_examples(EVAL_SAMPLES / "sample_alpaca_eval.json")
    assert len(examples) == 5 and examples[4]["reference"] == "Buenos días, ¿cómo estás?"
    records = bench.score(examples, [done(f"answer {i}" + "!" * 10 * i) for i in range(5)])
    [path] = bench.export(records, tmp_path)
    outputs = json.loads(path.read_text())
    assert outputs[1] == {"instruction": "Write a haiku about autumn leaves.", "output": "answer 1" + "!" * 10,
                          "generator": "my-model", "dataset": "selfinstruct"}  # fmt: skip
    wins = [True, False, None, True, True]
    m = bench.summarize([{**r, "model_wins": w} for r, w in zip(records, wins)])
    parsed = [r for r, w in zip(records, wins) if w is not None]
    lc = length_controlled_win_rate([1.0, 0.0, 1.0, 1.0], [len(r["output"]) for r in parsed],
                                    [len(r["reference"]) for r in parsed])  # fmt: skip
    assert (m["win_rate"], m["n_wins"], m["n_losses"], m["n_unparsed"]) == (0.75, 3, 1, 1)
    assert m["lc_win_rate"] == lc["lc_win_rate"] and m["method"] == METHOD
    bad = tmp_path / "ref.json"
    bad.write_text('[{"instruction": "x", "output": "y"}]')
    with pytest.raises(ValueError, match=r"ref.json\[0\]: missing or non-string \['generator', 'dataset'\]"):
        bench.load_examples(bad)


# ------------------------------------------------------------------------------------ length-controlled win rate


def _reference_fit(wins, model_lengths, reference_lengths, l2=1.0, steps=20000, lr=0.05):
    """Plain gradient descent on the same penalized logistic loss, float64: the naive reference for the Newton fit."""
    d = [m - r for m, r in zip(model_lengths, reference_lengths)]
    mean = sum(d) / len(d)
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    z = [math.tanh(x / std) for x in d]
    a = b = 0.0
    for _ in range(steps):
        p = [1 / (1 + math.exp(-(a + b * zi))) for zi in z]
        ga = sum(pi - y for pi, y in zip(p, wins)) + l2 * a
        gb = sum((pi - y) * zi for pi, y, zi in zip(p, wins, z)) + l2 * b
        a, b = a - lr * ga / len(z), b - lr * gb / len(z)
    return a, b


def test_length_controlled_win_rate_matches_naive_fit():
    wins = [1, 0, 1, 0, 1, 1, 0, 1, 0.5, 1]
    model = [100, 20, 300, 40, 500, 60, 70, 800, 90, 400]
    reference = [50, 80, 120, 60, 100, 90, 100, 200, 90, 150]
    lc = length_controlled_win_rate(wins, model, reference)
    a, b = _reference_fit(wins, model, reference)
    assert lc["intercept"] == pytest.approx(a, abs=1e-6) and lc["length_coef"] == pytest.approx(b, abs=1e-6)
    assert lc["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-a)), abs=1e-7)


def test_length_controlled_win_rate_discounts_wins_bought_by_length():
    # The model wins exactly when it is longer: the length term explains the wins, so the LC rate falls below the raw
    # rate; with the roles swapped (wins when shorter) it rises above it.
    model = [400, 380, 420, 390, 410, 100, 90, 110, 400, 395, 405, 385]
    reference = [200] * 12
    wins = [1.0 if m > 200 else 0.0 for m in model]
    raw = sum(wins) / len(wins)
    assert length_controlled_win_rate(wins, model, reference)["lc_win_rate"] < raw - 0.05
    flipped = [1.0 - w for w in wins]
    assert length_controlled_win_rate(flipped, model, reference)["lc_win_rate"] > (1 - raw) + 0.05
    # equal lengths: no length signal, only the intercept (shrunk toward 0.5 by the N(0, 1) prior)
    even = length_controlled_win_rate([1.0] * 75 + [0.0] * 25, [100] * 100, [100] * 100)
    assert even["length_coef"] == 0.0 and 0.73 < even["lc_win_rate"] < 0.75
    # every judgment one way stays finite thanks to the penalty
    assert 0.5 < length_controlled_win_rate([1.0] * 5, [1, 2, 3, 4, 5], [3] * 5)["lc_win_rate"] < 1.0
    assert length_controlled_win_rate([], [], [])["lc_win_rate"] is None
