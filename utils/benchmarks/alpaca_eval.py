"""AlpacaEval: 805 open-ended instructions; a judge compares each response with a reference model's response.

Data: the reference outputs file, a JSON array (or JSON Lines) of `{instruction, output, generator, dataset}`; its
`output` is the reference response. After generation the model's outputs are written in the same format to
`model_outputs.json` (the file the `alpaca_eval` CLI reads), then each pair is judged. Two protocols:

- reference (the published one): the `alpaca_eval` package scores `model_outputs.json` against the 805 GPT-4 Turbo
  baseline outputs (generator `gpt4_1106_preview`; a file by another generator, such as the text-davinci-003 outputs
  bundled with the instructions file, is refused) with the standard pairwise ranking annotator and `--seed 1337`;
  win_rate and lc_win_rate are its leaderboard's `win_rate` and `length_controlled_winrate`
  (utils/benchmarks/alpaca_eval_package.py).
- improved (offline, an APPROXIMATION of the package's numbers): our own pairwise judge (utils/benchmarks/judges.py)
  through OpenAICompatClient's cache, and the rates computed here, with nothing fetched at run time:
  - win_rate: share of parsed judgments where the model's response is preferred.
  - lc_win_rate: the length-controlled idea of Dubois et al. 2024 ("Length-Controlled AlpacaEval"): fit
    P(model wins) = sigmoid(intercept + length_coef * tanh(d / std(d))), d = model minus reference length in
    characters, by L2-penalized maximum likelihood, then predict with the length term at 0: sigmoid(intercept).
    Without the package's per-instruction difficulty term and regularization toward its leaderboard baselines, so
    the number is close to but not the same as alpaca_eval's `length_controlled_winrate`.
`summary.metrics.method` names the method that produced the numbers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from utils.benchmarks.base import check_protocol, mean, one_sample_each, select_examples
from utils.benchmarks.judges import Judge, JudgedBenchmark, judge_pairwise, judged_output
from utils.helper_fns import load_prompt, write_json
from utils.inference import Completion

ZERO_SHOT_FRAME = "zero_shot_system_prompt"
METHOD = "own_pairwise_judge+length_glm"
METHOD_DETAIL = (
    "APPROXIMATION of alpaca_eval's win rates (not comparable to the published table): pairwise judge "
    "(utils/benchmarks/judges.py PAIRWISE_SYSTEM_PROMPT) against the reference outputs, order fixed per "
    "instruction by a hash; win_rate = wins / parsed judgments; lc_win_rate = sigmoid(intercept) of a logistic fit of "
    "the win on tanh(standardized character-length difference) with L2 penalty 1, i.e. the length term set to 0 "
    "(Dubois et al. 2024 without the instruction-difficulty term); not computed by the alpaca_eval package"
)
PACKAGE_METHOD = "alpaca_eval_package"
PACKAGE_METHOD_DETAIL = (
    "alpaca_eval package (alpaca_eval evaluate, --seed 1337): standard pairwise ranking annotator "
    "(evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt, ChatML, greedy, max_tokens 100, batch size 1, "
    "ranking_parser) against the GPT-4 Turbo baseline outputs; win_rate / lc_win_rate = its leaderboard's win_rate / "
    "length_controlled_winrate divided by 100"
)
REFERENCE_GENERATOR = "gpt4_1106_preview"  # the 805 GPT-4 Turbo baseline outputs (alpaca_eval_gpt4_baseline.json)
REQUIRED_KEYS = ("instruction", "output", "generator", "dataset")
ANNOTATOR_DIR = "alpaca_eval_annotator"  # in the benchmark's output folder
PACKAGE_OUTPUT_DIR = "alpaca_eval_package"


def _log_sigmoid(s: float) -> float:
    return -math.log1p(math.exp(-s)) if s >= 0 else s - math.log1p(math.exp(s))


def _sigmoid(s: float) -> float:
    return math.exp(_log_sigmoid(s))


def length_controlled_win_rate(wins: list[float], model_lengths: list[int], reference_lengths: list[int],
                               l2: float = 1.0) -> dict:  # fmt: skip
    """Win rate with the effect of the length difference removed (see the module docstring).

    Minimizes  -sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] + l2 / 2 * (intercept^2 + length_coef^2),
    p_i = sigmoid(intercept + length_coef * tanh(d_i / std(d))), by Newton's method with step halving (the objective
    is strictly convex, so the optimum is unique). The penalty, a N(0, 1) prior on both weights, keeps the fit finite
    when every judgment goes one way; with hundreds of judgments it moves the result by well under a point.

    Args:
        wins: y_i in [0, 1] per parsed judgment (1 = the model's response preferred; 0.5 = a tie).
        model_lengths, reference_lengths: characters of the two responses, per judgment.
        l2: penalty strength.

    Returns:
        `{"lc_win_rate", "intercept", "length_coef"}`; all None when `wins` is empty. With fewer than two judgments or
        equal length differences the length feature is 0 and only the intercept is fitted.
    """
    n = len(wins)
    if not (n == len(model_lengths) == len(reference_lengths)):
        raise ValueError(f"{n} wins, {len(model_lengths)} model lengths, {len(reference_lengths)} reference lengths")
    if n == 0:
        return {"lc_win_rate": None, "intercept": None, "length_coef": None}
    d = [m - r for m, r in zip(model_lengths, reference_lengths)]
    mean_d = sum(d) / n
    std_d = math.sqrt(sum((x - mean_d) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    z = [math.tanh(x / std_d) if std_d > 0 else 0.0 for x in d]

    def objective(a: float, b: float) -> float:
        nll = -sum(y * _log_sigmoid(a + b * zi) + (1 - y) * _log_sigmoid(-(a + b * zi)) for y, zi in zip(wins, z))
        return nll + 0.5 * l2 * (a * a + b * b)

    a = b = 0.0
    f = objective(a, b)
    for _ in range(100):
        p = [_sigmoid(a + b * zi) for zi in z]
        ga = sum(pi - y for pi, y in zip(p, wins)) + l2 * a
        gb = sum((pi - y) * zi for pi, y, zi in zip(p, wins, z)) + l2 * b
        w = [pi * (1 - pi) for pi in p]
        haa = sum(w) + l2
        hab = sum(wi * zi for wi, zi in zip(w, z))
        hbb = sum(wi * zi * zi for wi, zi in zip(w, z)) + l2
        det = haa * hbb - hab * hab
        step_a, step_b = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        t = 1.0
        while t > 1e-10:
            f_new = objective(a - t * step_a, b - t * step_b)
            if f_new <= f:
                break
            t /= 2
        a, b, f = a - t * step_a, b - t * step_b, f_new
        if max(abs(t * step_a), abs(t * step_b)) < 1e-12:
            break
    return {"lc_win_rate": _sigmoid(a), "intercept": a, "length_coef": b}



class AlpacaEvalBenchmark(JudgedBenchmark):
    """AlpacaEval against a reference outputs file, judged pairwise after generation.

    A record holds `instruction`, `dataset`, `reference`, `reference_generator`, `response` (completion text),
    `output` (the judged text, `judged_output`), `response_tokens`, `finish_reason`; judging adds `model_wins`
    (True / False / None = unparsed or, under the package, a tie) and `judge_reply`, plus `model_position` (1 or 2)
    for our judge or `preference` (the package's: 1 = reference, 2 = model, 1.5 = tie) for the package.

    Args:
        frame_template: the text around the instruction, with one `{instruction}` slot; None = the zero-shot frame.
        generator: the name written as `generator` in model_outputs.json.
        protocol: "reference" = the alpaca_eval package; "improved" = our offline judge and win rates.
        max_concurrency: judge requests in flight under the package (ours take theirs from the Judge's client).
    """

    name = "alpaca_eval"
    # The published settings, keyed like evaluate_instruct.py's flags (REFERENCE.md, "Evaluation protocol"); the
    # package's annotator has its own fixed request settings (alpaca_eval_package.py).
    scorers = {"reference": "alpaca_eval package, standard ranking annotator, seed 1337, vs GPT-4 Turbo outputs",
               "improved": "own pairwise judge + length GLM without instruction difficulty (an approximation)"}
    reference_settings = {"max_tokens": 1024, "max_model_len": 2048, "max_num_seqs": 32}

    def __init__(self, frame_template: str | None = None, generator: str = "model", protocol: str = "improved",
                 max_concurrency: int = 16):  # fmt: skip
        check_protocol(protocol)
        self.protocol = protocol
        self.frame_template = load_prompt(ZERO_SHOT_FRAME) if frame_template is None else frame_template
        if "{instruction}" not in self.frame_template:
            raise ValueError("the frame template has no {instruction} slot")
        if protocol == "reference" and generator == REFERENCE_GENERATOR:
            raise ValueError(f"generator name {generator!r} is the reference outputs' own; the package would score "
                             f"the baseline against itself. Name the model something else")  # fmt: skip
        self.generator = generator
        self.max_concurrency = max_concurrency

    def load_examples(self, path: str | os.PathLike, max_examples: int = -1) -> list[dict]:
        """Read the reference outputs (JSON array or JSON Lines of `{instruction, output, generator, dataset}`).

        Returns:
            `[{"index", "instruction", "reference", "reference_generator", "dataset"}]`, the first `max_examples`
            (-1 = all).

        Raises:
            ValueError: a malformed record, or (reference protocol) outputs by another generator than the GPT-4
                Turbo baseline.
        """
        examples = []
        for i, (location, rec) in enumerate(self.read_records(path)):
            missing = [k for k in REQUIRED_KEYS if not isinstance(rec.get(k), str)]
            if missing:
                raise ValueError(f"{location}: missing or non-string {missing}; the record has keys {sorted(rec)}")
            if not rec["instruction"].strip():
                raise ValueError(f"{location}: empty instruction")
            examples.append({"index": i, "instruction": rec["instruction"], "reference": rec["output"],
                             "reference_generator": rec["generator"], "dataset": rec["dataset"]})  # fmt: skip
        others = sorted({ex["reference_generator"] for ex in examples} - {REFERENCE_GENERATOR})
        if self.protocol == "reference" and others:
            raise ValueError(
                f"{path}: reference outputs by {others}, but the reference protocol compares with the 805 GPT-4 Turbo "
                f"baseline outputs (generator {REFERENCE_GENERATOR!r}: alpaca_eval_gpt4_baseline.json of the "
                f"tatsu-lab/alpaca_eval dataset). The outputs bundled with the instructions file are another "
                f"model's; pass the baseline file with --data"
            )
        return select_examples(examples, max_examples)

    def build_prompt(self, example: dict) -> str:
        return self.frame_template.replace("{instruction}", example["instruction"])

    def score(self, examples: list[dict], completions: list[list[Completion]]) -> list[dict]:
        """Keep the responses; preferences come from `judge` after generation."""
        records = []
        for ex, c in zip(examples, one_sample_each(self.name, examples, completions)):
            records.append({
                "instruction": ex["instruction"],
                "dataset": ex["dataset"],
                "reference": ex["reference"],
                "reference_generator": ex["reference_generator"],
                "response": c.text,
                "output": judged_output(c.text, self.frame_template, self.protocol),
                "response_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
            })  # fmt: skip
        return records

    def export(self, records: list[dict], output_dir: Path) -> list[Path]:
        """`model_outputs.json`: a JSON array of `{instruction, output, generator, dataset}`, in data-file order."""
        path = Path(output_dir) / "model_outputs.json"
        write_json(path, [{"instruction": r["instruction"], "output": r["output"], "generator": self.generator,
                           "dataset": r["dataset"]} for r in records])  # fmt: skip
        return [path]

    def judge(self, records: list[dict], judge: Judge, output_dir: Path) -> tuple[list[dict], dict]:
        if self.protocol == "improved":
            return judge_pairwise(judge, [r["instruction"] for r in records], [r["output"] for r in records],
                                  [r["reference"] for r in records]), {}  # fmt: skip
        return self._judge_with_package(records, judge, Path(output_dir))

    def _judge_with_package(self, records: list[dict], judge: Judge, out: Path) -> tuple[list[dict], dict]:
        """Run the alpaca_eval package on model_outputs.json (written by `export`) against these records' reference
        outputs; per-record preferences from its annotations, win rates from its leaderboard."""
        from utils.benchmarks import alpaca_eval_package as package

        judge.client.check_server()  # an unreachable judge fails here, naming the URL, not deep inside the package
        reference = out / "reference_outputs.json"  # the selected examples' reference outputs, for the package
        write_json(reference, [{"instruction": r["instruction"], "output": r["reference"],
                                "generator": r["reference_generator"], "dataset": r["dataset"]} for r in records])
        annotator = package.write_annotator_config(out / ANNOTATOR_DIR, judge.config.model, judge.base_url)
        row, annotations = package.run_alpaca_eval_package(
            out / "model_outputs.json", reference, annotator, out / PACKAGE_OUTPUT_DIR,
            api_key_env=judge.config.api_key_env, max_concurrency=self.max_concurrency)  # fmt: skip
        by_instruction = {a["instruction"]: a for a in annotations}
        judgments = []
        for r in records:
            a = by_instruction.get(r["instruction"], {})
            preference = a.get("preference")
            preference = None if preference is None or preference != preference else float(preference)  # NaN -> None
            wins = None if preference is None or preference == 1.5 else preference > 1.5
            judgments.append({"model_wins": wins, "preference": preference,
                              "judge_reply": a.get("preference_raw_completion")})  # fmt: skip
        set_metrics = {**package.leaderboard_metrics(row), "package_leaderboard": row,
                       "package_version": package.package_version(), "package_seed": package.PACKAGE_SEED,
                       "annotator": package.annotator_name(judge.config.model)}  # fmt: skip
        return judgments, set_metrics

    def summarize(self, records: list[dict]) -> dict:
        """Win rate and length-controlled win rate. Improved: computed here over parsed judgments (an unparsed reply
        is neither a win nor a loss: it is counted in `n_unparsed` and `judge_parsed_rate`). Reference: the package's
        leaderboard numbers, added by `judge` (None here); `n_unparsed` counts pairs without a preference. Judge
        metrics are None until every record is judged. Rates are fractions (0.0523, not 5.23)."""
        judged = [r for r in records if "model_wins" in r]
        package = self.protocol == "reference"
        out = {
            "num_examples": len(records),
            "num_judged": len(judged),
            "win_rate": None,
            "lc_win_rate": None,
            "method": PACKAGE_METHOD if package else METHOD,
            "method_detail": PACKAGE_METHOD_DETAIL if package else METHOD_DETAIL,
            "approximation": not package,
            "n_wins": None,
            "n_losses": None,
            "n_unparsed": None,
            "judge_parsed_rate": None,
            "length_coef": None,
            "mean_output_chars": mean([len(r["output"]) for r in records]),
            "mean_reference_chars": mean([len(r["reference"]) for r in records]),
            "generator": self.generator,
            "reference_generators": sorted({r["reference_generator"] for r in records}),
        }
        if not records or len(judged) < len(records):
            return out
        if package:
            parsed = [r for r in records if r.get("preference") is not None]
            out.update({"n_unparsed": len(records) - len(parsed), "judge_parsed_rate": len(parsed) / len(records)})
            return out
        parsed = [r for r in records if r["model_wins"] is not None]
        wins = [float(r["model_wins"]) for r in parsed]
        lc = length_controlled_win_rate(wins, [len(r["output"]) for r in parsed], [len(r["reference"]) for r in parsed])
        out.update({
            "win_rate": mean(wins),
            "lc_win_rate": lc["lc_win_rate"],
            "n_wins": int(sum(wins)),
            "n_losses": len(parsed) - int(sum(wins)),
            "n_unparsed": len(records) - len(parsed),
            "judge_parsed_rate": len(parsed) / len(records),
            "length_coef": lc["length_coef"],
        })  # fmt: skip
        return out
