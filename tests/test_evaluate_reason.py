"""MATH benchmark loading and scoring, the resumable benchmark runner, and evaluate_reason.py end to end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from utils.benchmarks import REGISTRY, run_benchmark
from utils.benchmarks.base import read_records
from utils.benchmarks.math import MathBenchmark, load_math_examples, pass_at_k
from utils.helper_fns import REPO_ROOT, load_prompt
from utils.inference import Completion, InferenceEngine, SamplingConfig

SAMPLE_VAL = REPO_ROOT / "data" / "sft-reason" / "sample_val.jsonl"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def test_jsonl_and_json_array_load_the_same_examples_with_key_aliases(tmp_path):
    records = [
        {"problem": "1+1?", "expected_answer": "2"},
        {"question": "Half of 1?", "answer": "\\frac{1}{2}", "solution": "ignored"},
        {"problem": "Three?", "ground_truth": 3},  # a number becomes a string
        {"problem": "Either?", "expected_answer": ["1", "-1"]},  # a list of acceptable answers stays a list
    ]
    as_lines = load_math_examples(_write_jsonl(tmp_path / "a.jsonl", records))
    array_path = tmp_path / "b.jsonl"  # the published MATH files are JSON arrays named .jsonl
    array_path.write_text(json.dumps(records, indent=1))
    assert load_math_examples(array_path) == as_lines
    assert as_lines == [
        {"index": 0, "problem": "1+1?", "expected_answer": "2"},
        {"index": 1, "problem": "Half of 1?", "expected_answer": "\\frac{1}{2}"},
        {"index": 2, "problem": "Three?", "expected_answer": "3"},
        {"index": 3, "problem": "Either?", "expected_answer": ["1", "-1"]},
    ]
    assert load_math_examples(array_path, max_examples=2) == as_lines[:2]


@pytest.mark.parametrize(
    "records, as_array, message",
    [
        ([{"problem": "a", "answer": "1"}, {}, {"problem": "c"}], False, r"bad\.jsonl:2: missing key 'problem'"),
        ([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}, {"problem": "c"}], False,
         r"bad\.jsonl:3: missing key 'expected_answer' \(or 'answer', 'ground_truth'\); "
         r"the record has keys \['problem'\]"),
        ([{"problem": "a", "answer": "1"}, {"question": "b"}], True, r"bad\.jsonl\[1\]: missing key 'expected_answer'"),
        ([{"problem": "", "answer": "1"}], False, r"bad\.jsonl:1: the problem must be a non-empty string"),
        ([{"problem": "a", "answer": None}], True, r"bad\.jsonl\[0\]: the answer must be a string"),
    ],
)  # fmt: skip
def test_bad_record_names_file_position_and_key(tmp_path, records, as_array, message):
    path = tmp_path / "bad.jsonl"
    if as_array:
        path.write_text(json.dumps(records))
    else:
        _write_jsonl(path, records)
    with pytest.raises(ValueError, match=message):
        load_math_examples(path)


def test_malformed_json_line_is_located(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: malformed JSON"):
        load_math_examples(path)


def test_bundled_sample_is_valid_and_prompt_matches_training_template():
    examples = load_math_examples(SAMPLE_VAL)
    assert len(examples) == 20 and all(isinstance(ex["expected_answer"], str) for ex in examples)
    prompt = MathBenchmark().build_prompt(examples[0])
    template = load_prompt("r1_zero")
    assert prompt == template.replace("{question}", examples[0]["problem"])
    assert prompt.endswith("Assistant: <think>")


# ----------------------------------------------------------------------------------------------------------------------
# Scoring and summary


def test_pass_at_k_matches_enumeration():
    for n, c, k in itertools.product(range(1, 7), range(0, 7), range(1, 7)):
        if c > n or k > n:
            continue
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def _resp(answer: str | None) -> str:
    """An r1_zero-formatted response, or an unformatted one for None."""
    if answer is None:
        return "I think the answer is 5 but I forgot the tags"
    return f"Let me compute. </think> <answer> {answer} </answer>"


def _completions(answers: list[str | None], lengths: list[int]) -> list[Completion]:
    return [Completion(_resp(a), list(range(n)), "stop" if n < 50 else "length") for a, n in zip(answers, lengths)]


def test_math_summary_numbers_by_hand():
    bench = MathBenchmark(grader_workers=1)
    examples = [
        {"problem": "p0", "expected_answer": "5"},
        {"problem": "p1", "expected_answer": "\\frac{1}{2}"},
        {"problem": "p2", "expected_answer": "7"},
        {"problem": "p3", "expected_answer": "(1,2)"},
    ]
    # correct, correct (0.5 = 1/2), formatted but wrong, unformatted
    completions = _completions(["5", "0.5", "8", None], [10, 20, 30, 50])
    records = bench.score(examples, completions)  # bare Completions are taken as n = 1
    assert [r["reward"] for r in records] == [1.0, 1.0, 0.0, 0.0]
    assert [r["format_reward"] for r in records] == [1.0, 1.0, 1.0, 0.0]
    assert [r["answer"] for r in records] == ["5", "0.5", "8", None]
    m = bench.summarize(records)
    assert m["num_examples"] == m["num_samples"] == 4
    assert m["accuracy"] == 0.5 and m["format_accuracy"] == 0.75
    assert (m["n_correct"], m["n_formatted_wrong"], m["n_unformatted"]) == (2, 1, 1)
    assert m["mean_response_tokens"] == 27.5
    assert m["mean_response_tokens_correct"] == 15.0 and m["mean_response_tokens_incorrect"] == 40.0
    assert m["truncated_frac"] == 0.25
    assert "pass@1" not in m and "majority_accuracy" not in m


def test_math_pass_at_k_and_majority_vote_by_hand():
    bench = MathBenchmark(grader_workers=1)
    examples = [{"problem": f"p{i}", "expected_answer": "5"} for i in range(3)]
    completions = [
        _completions(["5", "3", "5", None], [4, 4, 4, 4]),  # 2 of 4 correct; majority "5" -> right
        _completions(["3", "5", "3", None], [4, 4, 4, 4]),  # 1 of 4; majority "3" -> wrong
        _completions(["2", "5", None, None], [4, 4, 4, 4]),  # 1 of 4; tie 2 vs 5 -> earliest ("2") -> wrong
    ]
    records = bench.score(examples, completions)
    assert all(len(r["samples"]) == 4 for r in records)
    assert records[0]["response"] == records[0]["samples"][0]["response"]  # top level = first sample
    m = bench.summarize(records)
    assert m["num_samples"] == 12 and m["accuracy"] == pytest.approx(4 / 12)
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6) + (1 - 3 / 6)) / 3)
    assert m["pass@4"] == pytest.approx(1.0)
    assert set(k for k in m if k.startswith("pass@")) == {"pass@1", "pass@2", "pass@4"}
    assert m["majority_accuracy"] == pytest.approx(1 / 3)


def test_majority_vote_groups_answers_by_normal_form():
    bench = MathBenchmark(grader_workers=1)
    examples = [{"problem": "p", "expected_answer": "1000"}]
    # by raw string: "999" 2, "1000" 2, "1,000" 1 -> the tie goes to the earlier "999" (wrong);
    # grouped by normal form: 1000 has 3 votes (right)
    completions = [_completions(["999", "999", "1,000", "1000", "1000"], [4] * 5)]
    m = bench.summarize(bench.score(examples, completions))
    assert m["majority_accuracy"] == 1.0


def test_majority_vote_joins_numerically_equal_forms():
    bench = MathBenchmark(grader_workers=1)
    examples = [{"problem": "p", "expected_answer": "\\frac{1}{2}"}, {"problem": "q", "expected_answer": "3"}]
    completions = [
        # by normal form "7" leads 2 to 1 to 1; 0.5 and \frac{1}{2} are one answer with 2 votes, first seen at
        # sample 0, so the tie with "7" goes to it (right)
        _completions(["0.5", "7", "7", "\\frac{1}{2}"], [4] * 4),
        # 3 votes for 3 in three forms against 2 for 4 (right); a wrong form must not join a right one
        _completions(["4", "3", "3.0", "4", "\\frac{6}{2}"], [4] * 5),
    ]
    records = bench.score(examples, completions)
    assert [[s["reward"] for s in r["samples"]] for r in records] == [[1, 0, 0, 1], [0, 1, 1, 0, 1]]
    assert bench.summarize(records)["majority_accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# The runner: chunks, resume, guards


class ScriptedEngine(InferenceEngine):
    """Answers problem i with a fixed response (correct / wrong / unformatted by i % 3), i + 1 tokens long; counts
    the prompts it was asked; can fail after a number of calls, as an interrupted run does."""

    backend = "scripted"
    model_name = "scripted-model"

    def __init__(self, examples: list[dict], fail_after_calls: int | None = None):
        self.by_prompt = {MathBenchmark().build_prompt(ex): ex for ex in examples}
        self.fail_after_calls = fail_after_calls
        self.calls = 0
        self.prompts_seen: list[str] = []

    def generate(self, prompts, sampling, use_tqdm=True, request_keys=None):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.prompts_seen += prompts
        out = []
        for p in prompts:
            ex = self.by_prompt[p]
            i = ex["index"]
            answer = [ex["expected_answer"], "-1", None][i % 3]
            out.append([Completion(_resp(answer), list(range(i + 1)), "stop") for _ in range(sampling.n)])
        return out


@pytest.fixture
def ten_problems(tmp_path) -> Path:
    return _write_jsonl(tmp_path / "ten.jsonl", [{"problem": f"What is {i} + 1?", "expected_answer": str(i + 1)}
                                                 for i in range(10)])  # fmt: skip


SAMPLING = SamplingConfig(temperature=1.0, max_tokens=16, stop=["</answer>"])


def test_runner_resumes_after_interruption_and_matches_an_uninterrupted_run(tmp_path, ten_problems):
    bench = MathBenchmark(grader_workers=1)
    examples = load_math_examples(ten_problems)
    full = run_benchmark(bench, ScriptedEngine(examples), ten_problems, SAMPLING, tmp_path / "full", chunk_size=3,
                         use_tqdm=False)  # fmt: skip

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(bench, ScriptedEngine(examples, fail_after_calls=2), ten_problems, SAMPLING, out, chunk_size=3,
                      use_tqdm=False)  # fmt: skip
    assert [r["index"] for r in read_records(out / "records.jsonl")] == list(range(6))  # two chunks kept
    engine = ScriptedEngine(examples)
    resumed = run_benchmark(bench, engine, ten_problems, SAMPLING, out, chunk_size=3, use_tqdm=False)
    assert len(engine.prompts_seen) == 4  # only the missing examples were generated
    assert read_records(out / "records.jsonl") == read_records(tmp_path / "full" / "records.jsonl")
    assert resumed["metrics"] == full["metrics"]
    assert full["metrics"]["accuracy"] == pytest.approx(4 / 10)  # i % 3 == 0: 0, 3, 6, 9
    for key, value in _recompute(read_records(out / "records.jsonl")).items():
        assert resumed["metrics"][key] == pytest.approx(value), key
    assert json.loads((out / "summary.json").read_text())["metrics"] == full["metrics"]
    assert resumed["throughput"]["examples_generated"] == 4
    assert resumed["throughput"]["generated_tokens"] == sum(i + 1 for i in range(6, 10))

    # Nothing left to do: a rerun generates nothing and reports the same numbers.
    engine = ScriptedEngine(examples)
    again = run_benchmark(bench, engine, ten_problems, SAMPLING, out, chunk_size=3, use_tqdm=False)
    assert engine.calls == 0 and again["metrics"] == full["metrics"]


def test_runner_drops_a_partial_last_line_and_redoes_that_example(tmp_path, ten_problems, capsys):
    bench = MathBenchmark(grader_workers=1)
    examples = load_math_examples(ten_problems)
    out = tmp_path / "run"
    run_benchmark(bench, ScriptedEngine(examples), ten_problems, SAMPLING, out, max_examples=4, use_tqdm=False)
    with open(out / "records.jsonl", "a") as f:
        f.write('{"index": 4, "prompt": "What is 4')  # killed mid-write
    engine = ScriptedEngine(examples)
    summary = run_benchmark(bench, engine, ten_problems, SAMPLING, out, max_examples=6, use_tqdm=False)
    assert "dropping a partial last line" in capsys.readouterr().out
    assert [bench.build_prompt(examples[i]) for i in (4, 5)] == engine.prompts_seen
    assert [r["index"] for r in read_records(out / "records.jsonl")] == list(range(6))
    assert summary["metrics"]["num_examples"] == 6


def test_runner_refuses_to_mix_settings_or_prompts(tmp_path, ten_problems):
    bench = MathBenchmark(grader_workers=1)
    examples = load_math_examples(ten_problems)
    out = tmp_path / "run"
    run_benchmark(bench, ScriptedEngine(examples), ten_problems, SAMPLING, out, max_examples=3, use_tqdm=False)
    hotter = SamplingConfig(temperature=0.7, max_tokens=16, stop=["</answer>"])
    with pytest.raises(ValueError, match=r"other settings \(sampling: .*'temperature': 1\.0.*'temperature': 0\.7"):
        run_benchmark(bench, ScriptedEngine(examples), ten_problems, hotter, out, use_tqdm=False)
    other_prompt = MathBenchmark(prompt_template="Q: {question}\nA: <think>", grader_workers=1)
    with pytest.raises(ValueError, match="example 0 was generated from another prompt"):
        run_benchmark(other_prompt, ScriptedEngine(examples), ten_problems, SAMPLING, out, use_tqdm=False)


def test_runner_without_output_dir_keeps_nothing(tmp_path, ten_problems, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = REGISTRY["math"](grader_workers=1)
    summary = run_benchmark(bench, ScriptedEngine(load_math_examples(ten_problems)), ten_problems, SAMPLING, None,
                            chunk_size=-1, use_tqdm=False)  # fmt: skip
    assert summary["metrics"]["num_examples"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ten.jsonl"]


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_reason.py


def _recompute(records: list[dict]) -> dict:
    """The summary's numbers straight from the per-example records, written independently of summarize()."""
    samples = [s for r in records for s in r.get("samples", [r])]
    n = len(samples)
    correct = [s["response_tokens"] for s in samples if s["format_reward"] == 1 and s["answer_reward"] == 1]
    wrong = [s["response_tokens"] for s in samples if not (s["format_reward"] == 1 and s["answer_reward"] == 1)]
    return {
        "num_examples": len(records),
        "num_samples": n,
        "accuracy": sum(s["reward"] for s in samples) / n,
        "format_accuracy": sum(s["format_reward"] for s in samples) / n,
        "n_correct": len(correct),
        "n_formatted_wrong": sum(s["format_reward"] == 1 and s["answer_reward"] == 0 for s in samples),
        "n_unformatted": sum(s["format_reward"] == 0 for s in samples),
        "mean_response_tokens": sum(s["response_tokens"] for s in samples) / n,
        "mean_response_tokens_correct": sum(correct) / len(correct) if correct else None,
        "mean_response_tokens_incorrect": sum(wrong) / len(wrong) if wrong else None,
        "truncated_frac": sum(s["finish_reason"] == "length" for s in samples) / n,
    }


def test_evaluate_reason_end_to_end_on_the_bundled_sample(tiny_qwen_dir, tmp_path, capsys, monkeypatch):
    from evaluate_reason import main, parse_args

    out = tmp_path / "eval"
    argv = ["--model", str(tiny_qwen_dir), "--data", str(SAMPLE_VAL), "--max-tokens", "24", "--n-samples", "2",
            "--engine", "auto", "--max-model-len", "512", "--max-num-seqs", "64",
            "--enforce-eager", "--chunk-size", "8", "--grader-workers", "1", "--output-dir", str(out),
            "--no-progress"]  # fmt: skip
    args = parse_args(argv)
    summary = main(args)
    printed = capsys.readouterr().out
    assert "inference:" in printed and "accuracy" in printed and "generated tokens/s" in printed
    assert "dtype: float32 (the checkpoint's dtype)" in printed  # CPU keeps an fp32 checkpoint in fp32, and says so

    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(vars(args)))
    records = read_records(out / "records.jsonl")
    examples = load_math_examples(SAMPLE_VAL)
    assert [r["index"] for r in records] == list(range(20))
    assert [r["prompt"] for r in records] == [MathBenchmark().build_prompt(ex) for ex in examples]
    assert [r["expected_answer"] for r in records] == [ex["expected_answer"] for ex in examples]
    assert all(len(r["samples"]) == 2 for r in records)
    assert all(0 < s["response_tokens"] <= 24 and s["finish_reason"] in ("stop", "length")
               for r in records for s in r["samples"])  # fmt: skip

    saved = json.loads((out / "summary.json").read_text())
    assert saved["metrics"] == summary["metrics"]
    metrics = saved["metrics"]
    for key, value in _recompute(records).items():
        assert metrics[key] is None if value is None else metrics[key] == pytest.approx(value), key
    assert metrics["pass@1"] == pytest.approx(metrics["accuracy"])
    assert metrics["pass@2"] == pytest.approx(sum(any(s["reward"] for s in r["samples"]) for r in records) / 20)
    t = saved["throughput"]
    assert t["examples_generated"] == 20
    assert t["generated_tokens"] == sum(s["response_tokens"] for r in records for s in r["samples"])
    assert t["generated_tokens_per_s"] == pytest.approx(t["generated_tokens"] / t["generation_s"], rel=1e-2)
    assert t["examples_per_s"] == pytest.approx(20 / t["wall_s"], rel=1e-2)

    # The same command again (HF this time) finds every example done and reports the same numbers.
    again = main(parse_args(argv[:argv.index("--engine") + 1] + ["hf"] + argv[argv.index("--engine") + 2 :]))
    assert again["metrics"] == metrics and again["throughput"]["examples_generated"] == 0

    # Other sampling settings into the same folder stop before any model loads.
    import utils.inference

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(utils.inference, "make_engine", no_model)
    with pytest.raises(SystemExit, match=r"--output-dir: .* other settings \(sampling: .*'temperature': 1\.0"):
        main(parse_args([*argv, "--temperature", "0.7"]))


def test_evaluate_reason_greedy_vllm_and_hf_give_the_same_records(tiny_qwen_dir, tmp_path):
    """Both backends at the checkpoint's dtype (float32 here; vLLM's own "auto" would pick half precision)."""
    from conftest import diversified_copy, has_vllm

    from evaluate_reason import main, parse_args

    if not has_vllm():
        pytest.skip("vLLM is not installed")
    model_dir = diversified_copy(tiny_qwen_dir, tmp_path / "model")
    common = ["--model", str(model_dir), "--data", str(SAMPLE_VAL), "--max-examples", "6", "--temperature", "0",
              "--max-tokens", "24", "--max-model-len", "512", "--enforce-eager", "--grader-workers", "1",
              "--no-progress"]  # fmt: skip
    main(parse_args([*common, "--engine", "vllm", "--output-dir", str(tmp_path / "vllm")]))
    main(parse_args([*common, "--engine", "hf", "--output-dir", str(tmp_path / "hf")]))
    v, h = read_records(tmp_path / "vllm" / "records.jsonl"), read_records(tmp_path / "hf" / "records.jsonl")
    assert len(v) == 6 and v == h
    assert len({r["response"] for r in v}) == 6


def _unloadable_model(tmp_path):
    """A folder that passes the --model check (it has a config.json) but that no loader could load: a test that
    reaches model loading fails loudly instead of passing by accident."""
    folder = tmp_path / "unloadable-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-samples", "4", "--temperature", "0"], "--n-samples 4 with --temperature 0"),
        (["--data", "data/sft-reason/missing.jsonl"],
         r"missing\.jsonl: file not found \(download it: python play-scripts"),
        (["--chunk-size", "0"], "--chunk-size 0"),
        (["--top-p", "0"], "--top-p 0"),
        (["--data-parallel-size", "2"], "cannot run data parallel inside one process. Run one evaluation per GPU"),
        (["--tensor-parallel-size", "2", "--device", "cpu"], "--tensor-parallel-size 2 needs CUDA GPUs"),
    ],
)  # fmt: skip
def test_evaluate_reason_rejects_bad_flags_before_loading_a_model(tmp_path, extra, message):
    from evaluate_reason import main, parse_args

    args = parse_args(["--model", str(_unloadable_model(tmp_path)), "--data", str(SAMPLE_VAL),
                       "--output-dir", str(tmp_path / "out"), *extra])  # fmt: skip
    with pytest.raises(SystemExit, match=message):
        main(args)
    assert not (tmp_path / "out").exists()


def test_evaluate_reason_bad_record_stops_before_loading_a_model(tmp_path):
    from evaluate_reason import main, parse_args

    data = _write_jsonl(tmp_path / "val.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    args = parse_args(["--model", str(_unloadable_model(tmp_path)), "--data", str(data),
                       "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"val\.jsonl:2: missing key 'expected_answer'"):
        main(args)


def test_yaml_config_sets_defaults_and_flags_override(tmp_path):
    from evaluate_reason import parse_args

    args = parse_args(["--config", str(REPO_ROOT / "data" / "eval_configs" / "math.yaml"), "--temperature", "0"])
    assert args.temperature == 0.0 and args.max_tokens == 1024 and args.stop == ["</answer>"]
    assert args.data == "data/sft-reason/val.jsonl" and args.include_stop_str is True
    assert args.prompt_template == "data/r1_zero.prompt"
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark: math\ntemprature: 0.5\n")
    with pytest.raises(SystemExit, match=r"unknown keys \['temprature'\]"):
        parse_args(["--config", str(bad)])


def test_math_prompt_template_may_contain_literal_braces():
    bench = MathBenchmark(prompt_template="Put the final answer in \\boxed{}. {question}\nAssistant: <think>")
    assert (bench.build_prompt({"problem": "What is {1+1}?"})
            == "Put the final answer in \\boxed{}. What is {1+1}?\nAssistant: <think>")


def test_resume_refuses_records_of_another_checkpoint_behind_the_same_path(tmp_path, ten_problems):
    """`checkpoints/latest` re-pointed (or a checkpoint rewritten in place) between an interrupted evaluation and its
    rerun: the records of two models must not mix in one summary."""
    bench = MathBenchmark(grader_workers=1)
    examples = load_math_examples(ten_problems)
    ckpts = tmp_path / "checkpoints"
    for step, payload in (("step_000003", b"A" * 4096), ("step_000006", b"B" * 4096)):
        (ckpts / step).mkdir(parents=True)
        (ckpts / step / "config.json").write_text('{"model_type": "qwen2"}')
        (ckpts / step / "model.safetensors").write_bytes(payload)
    latest = ckpts / "latest"
    latest.symlink_to("step_000003")
    engine = ScriptedEngine(examples, fail_after_calls=1)
    engine.model_name = str(latest)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(bench, engine, ten_problems, SAMPLING, out, chunk_size=3, use_tqdm=False)
    before = (out / "records.jsonl").read_bytes()
    latest.unlink()
    latest.symlink_to("step_000006")  # a later save moved the link
    engine = ScriptedEngine(examples)
    engine.model_name = str(latest)
    with pytest.raises(ValueError, match=r"holds records made with other settings \(model_fingerprint: .*"
                                         r"model_resolved: .*step_000003.* -> .*step_000006"):
        run_benchmark(bench, engine, ten_problems, SAMPLING, out, chunk_size=3, use_tqdm=False)
    assert engine.calls == 0 and (out / "records.jsonl").read_bytes() == before
    # the same folder rewritten in place (same names and sizes, other weights) is caught by the fingerprint
    latest.unlink()
    latest.symlink_to("step_000003")
    (ckpts / "step_000003" / "model.safetensors").write_bytes(b"C" * 4096)
    with pytest.raises(ValueError, match=r"model_fingerprint: '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        run_benchmark(bench, engine, ten_problems, SAMPLING, out, chunk_size=3, use_tqdm=False)
    assert (out / "records.jsonl").read_bytes() == before
