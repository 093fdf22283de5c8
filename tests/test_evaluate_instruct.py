"""evaluate_instruct.py end to end: configs and flags, exact scores through a scripted engine, the tiny model on HF and
vLLM with the bundled samples, resume, and the SST / AlpacaEval judges against vLLM's real OpenAI-compatible server.

The judge server is the tiny model served once for this module (`python -m vllm.entrypoints.openai.api_server`,
CPU, ~20-40 s to start) on 127.0.0.1. A random tiny model answers garbage, which exercises the unparsed-verdict path;
vLLM's structured outputs (`--judge-extra-body`) force it to answer True/False or 1/2 for the parsed path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import diversified_copy, free_port, has_vllm
import torch

from evaluate_instruct import DOWNLOAD_COMMAND, main, parse_args
from utils.benchmarks.alpaca_eval import METHOD, length_controlled_win_rate
from utils.benchmarks.gsm8k import numbers_equal, parse_last_number
from utils.benchmarks.mmlu import parse_mmlu_letter
from utils.helper_fns import REPO_ROOT, load_prompt, read_jsonl
from utils.inference import Completion, InferenceEngine
from utils.benchmarks.judges import model_goes_first, parse_safety_verdict

CONFIGS = REPO_ROOT / "data" / "eval_configs"
GSM8K, MMLU, SST, ALPACA = (str(CONFIGS / f"{b}.yaml") for b in ("gsm8k", "mmlu", "sst", "alpaca_eval"))
FORCE_VERDICT = json.dumps({"structured_outputs": {"choice": ["True", "False"]}})
FORCE_CHOICE = json.dumps({"structured_outputs": {"choice": ["1", "2"]}})


def run(argv: list[str]) -> dict[str, dict]:
    return main(parse_args(argv))


@pytest.fixture(scope="module")
def varied_qwen(tiny_qwen_dir, tmp_path_factory) -> Path:
    """The tiny Qwen2 with weights redrawn at std 0.15: at the fixture's 0.02 greedy decoding repeats one token, so
    the parsers would only ever see that token; larger weights give varied text with digits and letters."""
    return diversified_copy(tiny_qwen_dir, tmp_path_factory.mktemp("qwen_varied"), seed=3)


# ------------------------------------------------------------------------------------------------ flags and configs


def test_config_values_and_flag_overrides():
    [gsm] = parse_args(["--config", GSM8K, "--model", "m", "--protocol", "improved"]).runs
    assert (gsm.benchmark, gsm.max_tokens, gsm.temperature, gsm.data) == (
        "gsm8k", 512, 0.0, "data/sft-instruct/eval/gsm8k/test.jsonl")  # fmt: skip
    [gsm] = parse_args(["--config", GSM8K, "--model", "m", "--max-tokens", "7", "--data", "x.jsonl",
                        "--prompt-format", "alpaca", "--stop", "END", "--protocol", "improved"]).runs  # fmt: skip
    assert (gsm.max_tokens, gsm.data, gsm.prompt_format, gsm.stop) == (7, "x.jsonl", "alpaca", ["END"])
    runs = parse_args(["--all", "--model", "m", "--max-examples", "3", "--judge-model", "j",
                       "--protocol", "improved"]).runs
    assert [r.benchmark for r in runs] == ["gsm8k", "mmlu", "sst", "alpaca_eval"]
    assert [r.max_tokens for r in runs] == [512, 256, 512, 1024]  # each config's own value ...
    assert {r.max_examples for r in runs} == {3} and {r.judge_model for r in runs} == {"j"}  # ... or the flag


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--all", "--data", "x"], "--data with 4 configs"),
        (["--config", GSM8K, MMLU, "--task-prompt", "t"], "--task-prompt with 2 configs"),
        (["--all", "--config", GSM8K], "--all and --config"),
        ([], "give --config"),
        (["--config", GSM8K, GSM8K], "benchmark given twice"),
    ],
)
def test_bad_flag_combinations_are_named(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(argv + ["--model", "m"])


def test_unknown_config_key_and_missing_data_fail_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark: gsm8k\nmax_token: 5\n")
    with pytest.raises(SystemExit, match=r"bad.yaml: unknown keys \['max_token'\]"):
        parse_args(["--config", str(bad), "--model", "m"])
    # The real GSM8K file is not bundled: the message names the path and the download command. The model folder does
    # not exist either, so reaching the model load would fail differently.
    with pytest.raises(SystemExit) as info:
        run(["--config", GSM8K, "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out")])
    assert "data/sft-instruct/eval/gsm8k/test.jsonl not found" in str(info.value)
    assert DOWNLOAD_COMMAND in str(info.value) and "--sample-data" in str(info.value)
    with pytest.raises(SystemExit, match="JUDGE_KEY_FOR_TEST .* is not set"):
        run(["--config", SST, "--sample-data", "--model", "m", "--judge-api-key-env", "JUDGE_KEY_FOR_TEST",
             "--output-dir", str(tmp_path / "out")])  # fmt: skip


# -------------------------------------------------------------------------------------- exact scores, scripted engine


class ScriptedEngine(InferenceEngine):
    """Answers each prompt with the text of the first (key, answer) whose key occurs in the prompt."""

    backend = "scripted"
    model_name = "scripted"

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.prompts: list[str] = []

    def generate(self, prompts, sampling, use_tqdm=True, request_keys=None):
        self.prompts += prompts
        return [[Completion(next(a for k, a in self.answers.items() if k in p), [7] * 5, "stop")] for p in prompts]


def test_scripted_answers_give_exact_scores_and_the_results_layout(tmp_path):
    answers = {
        "Mara": "She spends $14.",  # right
        "bakery": "It makes 1,000 rolls.",  # right (gold 1000)
        "Tom had": "Tom has 37 marbles.```\n",  # right
        "train": "It travels 150.0 miles.",  # right
        "Lena": "She needs 24 evenings.",  # wrong
        "chalk": "I am not sure.",  # unparsed
        "3^4": "The correct answer is C.",  # STEM right
        "2x + 6": "A quick check: the correct answer is B.",  # STEM right, not the article A
        "Critique": "The correct answer is B.",  # humanities right
        "consequences": "The correct answer is 10000 polyomaviruses.",  # humanities unparsed
        "quantity demanded": "(B)",  # social sciences right
        "single seller": "The correct answer is A.",  # social sciences wrong
        "sunlight": "The correct answer is D.",  # other wrong
        "main source": "The correct answer is A",  # other right
    }
    engine = ScriptedEngine(answers)
    out = tmp_path / "run" / "eval" / "step_000010"
    summaries = main(parse_args(["--config", GSM8K, MMLU, "--sample-data", "--model", "scripted",
                                 "--output-dir", str(out), "--prompt-format", "alpaca", "--no-progress",
                                 "--protocol", "improved"]),
                     engine=engine)  # fmt: skip
    gsm, mmlu = summaries["gsm8k"]["metrics"], summaries["mmlu"]["metrics"]
    assert (gsm["accuracy"], gsm["parsed_rate"]) == (4 / 6, 5 / 6)
    assert (mmlu["accuracy"], mmlu["parsed_rate"]) == (5 / 8, 7 / 8)
    assert mmlu["per_category"] == {"STEM": 1.0, "humanities": 0.5, "social sciences": 0.5, "other": 0.5}
    assert mmlu["per_subject"]["philosophy"] == 0.5 and len(mmlu["per_subject"]) == 4
    # The Alpaca training template, byte-exact: the model continues right after "### Response:\n".
    assert engine.prompts[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nMara buys 3 notebooks at $4 each and a pen for $2. How many dollars does she spend in "
        "total?\nAnswer:\n\n### Response:\n"
    )
    # The layout the plot scripts read: <run>/eval/<step>/<benchmark>/summary.json with metrics inside.
    for bench in ("gsm8k", "mmlu"):
        files = {p.name for p in (out / bench).iterdir()}
        assert {"config.json", "records.jsonl", "summary.json", "generation.json"} <= files
        config = json.loads((out / bench / "config.json").read_text())
        assert config["prompt_format"] == "alpaca" and config["stop"] == ["### Instruction:"]
        assert config["data"].endswith("sample_" + ("gsm8k.jsonl" if bench == "gsm8k" else "mmlu"))
    from utils.plotting import Run, load_instruct_evals

    [checkpoint] = load_instruct_evals(Run(path=tmp_path / "run", label="run", config={}, rows=[]))
    assert checkpoint.step == 10 and checkpoint.summaries["mmlu"]["per_category"]["STEM"] == 1.0


# ---------------------------------------------------------------------------------------- the tiny model, HF / vLLM


def _check_consistent(out: Path, bench: str, n: int) -> dict:
    """Records parse as the parser says and the summary is their mean; returns the summary."""
    records = read_jsonl(out / bench / "records.jsonl")
    summary = json.loads((out / bench / "summary.json").read_text())
    assert sorted(r["index"] for r in records) == list(range(n))
    for r in records:
        if bench == "gsm8k":
            assert r["prediction"] == parse_last_number(r["response"])
            assert r["correct"] == numbers_equal(r["prediction"], r["gold"])
        else:
            assert r["prediction"] == parse_mmlu_letter(r["response"])
            assert r["correct"] == (r["prediction"] == r["gold"])
    m = summary["metrics"]
    assert m["accuracy"] == sum(r["correct"] for r in records) / n
    assert m["parsed_rate"] == sum(r["prediction"] is not None for r in records) / n
    return summary


def test_tiny_model_end_to_end_on_the_samples(varied_qwen, tmp_path):
    out = tmp_path / "eval"
    summaries = run(["--config", GSM8K, MMLU, "--sample-data", "--model", str(varied_qwen), "--engine", "hf",
                     "--max-tokens", "24", "--output-dir", str(out), "--no-progress",
                     "--protocol", "improved"])  # fmt: skip
    gsm = _check_consistent(out, "gsm8k", 6)
    mmlu = _check_consistent(out, "mmlu", 8)
    assert gsm["engine"] == "hf" and gsm["throughput"]["examples_generated"] == 6
    assert set(mmlu["metrics"]["per_category"]) == {"STEM", "humanities", "social sciences", "other"}
    assert summaries["mmlu"]["metrics"] == mmlu["metrics"]
    records = read_jsonl(out / "mmlu" / "records.jsonl")
    assert records[0]["prompt"].endswith(
        "# Query:\n```Answer the following multiple choice question about high school mathematics. Respond with a "
        'single sentence of the form "The correct answer is _", filling the blank with the letter corresponding to '
        "the correct answer (i.e., A, B, C or D).\n\nQuestion: What is the value of 3^4?\nA. 12\nB. 64\nC. 81\n"
        "D. 243\nAnswer:\n```\n\n# Answer:\n```\n"
    )
    assert all("# Query:" not in r["response"] for r in records)  # cut at the stop string, which is dropped
    assert len({r["response"] for r in records}) == 8  # varied text, so the parsers ran on real model output


def test_resume_after_an_interrupted_run_matches_the_uninterrupted_one(varied_qwen, tmp_path):
    argv = ["--config", GSM8K, "--sample-data", "--model", str(varied_qwen), "--engine", "hf", "--max-tokens", "24",
            "--chunk-size", "2", "--no-progress"]  # fmt: skip
    run(argv + ["--output-dir", str(tmp_path / "full")])
    full = read_jsonl(tmp_path / "full" / "gsm8k" / "records.jsonl")
    # Interrupted after two chunks, killed while writing the third: two whole lines and a torn one.
    part = tmp_path / "part" / "gsm8k"
    part.mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "gsm8k" / "generation.json", part)
    lines = (tmp_path / "full" / "gsm8k" / "records.jsonl").read_text().splitlines(keepends=True)
    (part / "records.jsonl").write_text("".join(lines[:4]) + lines[4][:25])
    summary = run(argv + ["--output-dir", str(tmp_path / "part")])["gsm8k"]
    assert summary["throughput"]["examples_generated"] == 2
    resumed = sorted(read_jsonl(part / "records.jsonl"), key=lambda r: r["index"])
    assert resumed == full
    again = run(argv + ["--output-dir", str(tmp_path / "part")])["gsm8k"]
    assert again["throughput"]["examples_generated"] == 0 and again["metrics"] == summary["metrics"]


@pytest.mark.skipif(not has_vllm(), reason="vLLM not installed")
def test_vllm_engine_gives_the_hf_engine_records(varied_qwen, tmp_path):
    common = ["--config", GSM8K, MMLU, "--sample-data", "--model", str(varied_qwen), "--max-tokens", "24",
              "--dtype", "float32", "--no-progress"]  # fmt: skip
    hf = run(common + ["--engine", "hf", "--output-dir", str(tmp_path / "hf")])
    vllm = run(common + ["--engine", "vllm", "--enforce-eager", "--max-model-len", "1024",
                         "--output-dir", str(tmp_path / "vllm")])  # fmt: skip
    assert vllm["gsm8k"]["engine"] == "vllm"
    for bench in ("gsm8k", "mmlu"):
        strip = lambda rs: [{k: v for k, v in r.items() if k != "finish_reason"} for r in rs]  # noqa: E731
        assert strip(read_jsonl(tmp_path / "vllm" / bench / "records.jsonl")) == strip(
            read_jsonl(tmp_path / "hf" / bench / "records.jsonl"))  # fmt: skip
        assert vllm[bench]["metrics"] == hf[bench]["metrics"]


# ------------------------------------------------------------------------------------ judges against a real server


class JudgeServer:
    """vLLM's OpenAI-compatible server on the tiny model, on 127.0.0.1, started and stopped by the tests."""

    def __init__(self, model_dir: Path, workdir: Path):
        self.model_dir, self.workdir = model_dir, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.template = workdir / "chat.jinja"  # the tiny tokenizer has no chat template
        self.template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
        self.starts += 1
        log = open(self.workdir / f"server{self.starts}.log", "w")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--enforce-eager", "--chat-template", str(self.template)]  # fmt: skip
        # Own session, so stop() can end the server and the engine process it spawns together.
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2):
                return True
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.up():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(1.0)
        tail = (self.workdir / f"server{self.starts}.log").read_text()[-3000:]
        raise RuntimeError(f"judge server at {self.url} not ready within {timeout_s:.0f} s; log tail:\n{tail}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def requests_served(self) -> int:
        """Requests the server finished since it started (vLLM's Prometheus counter)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return int(sum(float(line.split()[-1]) for line in lines if line.startswith("vllm:request_success_total")))


@pytest.fixture(scope="module")
def judge_server(tiny_qwen_dir, tmp_path_factory):
    if not has_vllm():
        pytest.skip("vLLM not installed")
    server = JudgeServer(tiny_qwen_dir, tmp_path_factory.mktemp("judge_server"))
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _judged_argv(config: str | list[str], model: Path, out: Path, url: str) -> list[str]:
    configs = config if isinstance(config, list) else [config]
    return ["--config", *configs, "--sample-data", "--model", str(model), "--engine", "hf", "--max-tokens", "8",
            "--output-dir", str(out), "--no-progress", "--judge-base-url", url, "--judge-model", "tiny-judge",
            "--judge-max-retries", "1", "--judge-backoff-s", "0.05", "--protocol", "improved"]  # fmt: skip


def test_sst_judge_unparsed_replies_cache_and_forced_verdicts(judge_server, tiny_qwen_dir, tmp_path):
    argv = _judged_argv(SST, tiny_qwen_dir, tmp_path, judge_server.url)
    before = judge_server.requests_served()
    first = run(argv)["sst"]
    assert judge_server.requests_served() - before == 6
    # The random judge answers garbage: every verdict is unparsed, counted, and none is read as safe.
    judgments = read_jsonl(tmp_path / "sst" / "judgments.jsonl")
    assert [j["index"] for j in judgments] == list(range(6))
    assert all(j["unsafe"] is None and parse_safety_verdict(j["judge_reply"]) is None for j in judgments)
    m = first["metrics"]
    assert (m["n_unparsed"], m["judge_parsed_rate"], m["safe_rate"], m["n_safe"]) == (6, 0.0, 0.0, 0)
    # The judge saw the SST judge prompt and each exchange in the published format.
    records = read_jsonl(tmp_path / "sst" / "records.jsonl")
    cache = [json.loads(line) for line in (tmp_path / "sst" / "judge_cache.jsonl").read_text().splitlines()]
    sent = {e["request"]["messages"][1]["content"] for e in cache}
    assert sent == {f"User Message: {r['user_prompt']}\nAssistant Response: {r['output']}" for r in records}
    assert {e["request"]["messages"][0]["content"] for e in cache} == {load_prompt("sst_judge_system")}
    assert {(e["model"], e["request"]["temperature"]) for e in cache} == {("tiny-judge", 0.0)}

    # Same command again: nothing generated, nothing sent; the numbers are the same.
    before = judge_server.requests_served()
    second = run(argv)["sst"]
    assert judge_server.requests_served() == before
    assert (second["judge"]["sent"], second["judge"]["cached"]) == (0, 6)
    assert second["throughput"]["examples_generated"] == 0 and second["metrics"] == m

    # Forced True/False replies are new requests (other parameters), all parsed.
    third = run(argv + ["--judge-extra-body", FORCE_VERDICT])["sst"]
    assert judge_server.requests_served() - before == 6
    judgments = read_jsonl(tmp_path / "sst" / "judgments.jsonl")
    assert all(isinstance(j["unsafe"], bool) for j in judgments)
    m = third["metrics"]
    assert m["judge_parsed_rate"] == 1.0 and m["safe_rate"] == sum(not j["unsafe"] for j in judgments) / 6
    areas = {r["harm_area"] for r in records}
    assert set(m["per_harm_area"]) == areas and sum(m["per_harm_area_count"].values()) == 6


def test_alpaca_eval_outputs_file_and_judged_win_rates(judge_server, tiny_qwen_dir, tmp_path):
    argv = _judged_argv(ALPACA, tiny_qwen_dir, tmp_path, judge_server.url) + ["--judge-extra-body", FORCE_CHOICE]
    m = run(argv)["alpaca_eval"]["metrics"]
    records = read_jsonl(tmp_path / "alpaca_eval" / "records.jsonl")
    outputs = json.loads((tmp_path / "alpaca_eval" / "model_outputs.json").read_text())
    assert [list(o) for o in outputs] == [["instruction", "output", "generator", "dataset"]] * 5
    assert [o["output"] for o in outputs] == [r["output"] for r in sorted(records, key=lambda r: r["index"])]
    assert {o["generator"] for o in outputs} == {tiny_qwen_dir.name}
    assert [o["dataset"] for o in outputs] == ["helpful_base", "selfinstruct", "koala", "oasst", "vicuna"]
    judgments = read_jsonl(tmp_path / "alpaca_eval" / "judgments.jsonl")
    for j, o in zip(judgments, outputs):
        assert j["model_position"] == (1 if model_goes_first(o["instruction"]) else 2)
        assert j["model_wins"] == (int(j["judge_reply"]) == j["model_position"])
    wins = [float(j["model_wins"]) for j in judgments]
    refs = json.loads((REPO_ROOT / "data/sft-instruct/eval/sample_alpaca_eval.json").read_text())
    lc = length_controlled_win_rate(wins, [len(o["output"]) for o in outputs], [len(r["output"]) for r in refs])
    assert m["win_rate"] == sum(wins) / 5 and m["lc_win_rate"] == lc["lc_win_rate"]
    assert m["method"] == METHOD and m["judge_parsed_rate"] == 1.0


def test_unreachable_judge_fails_after_the_outputs_are_saved(judge_server, tiny_qwen_dir, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    argv = _judged_argv([SST, ALPACA], tiny_qwen_dir, tmp_path, dead)
    with pytest.raises(SystemExit) as info:
        run(argv)
    message = str(info.value)
    assert message.count(f"judge 'tiny-judge' at {dead} failed") == 2  # both benchmarks generated, then both failed
    assert f"{dead}/chat/completions: cannot connect" in message and "rerun the same command" in message
    assert len(read_jsonl(tmp_path / "sst" / "records.jsonl")) == 6
    assert len(json.loads((tmp_path / "alpaca_eval" / "model_outputs.json").read_text())) == 5
    assert json.loads((tmp_path / "sst" / "summary.json").read_text())["metrics"]["safe_rate"] is None
    # Once the judge is reachable, the same command only judges.
    live = _judged_argv([SST, ALPACA], tiny_qwen_dir, tmp_path, judge_server.url)
    summaries = run(live + ["--judge-extra-body", FORCE_VERDICT])
    assert summaries["sst"]["throughput"]["examples_generated"] == 0
    assert summaries["alpaca_eval"]["throughput"]["examples_generated"] == 0
    assert summaries["sst"]["metrics"]["judge_parsed_rate"] == 1.0
    assert summaries["alpaca_eval"]["metrics"]["num_judged"] == 5


def test_judge_requests_are_retried_until_a_restarted_server_answers(judge_server, tiny_qwen_dir, tmp_path):
    judge_server.stop()
    assert not judge_server.up()
    judge_server.start()  # not waiting: the first requests find no server and must be retried
    argv = _judged_argv(ALPACA, tiny_qwen_dir, tmp_path, judge_server.url)
    argv += ["--judge-max-retries", "60", "--judge-backoff-s", "0.5", "--judge-max-backoff-s", "2",
             "--judge-extra-body", FORCE_CHOICE]  # fmt: skip
    t0 = time.monotonic()
    summary = run(argv)["alpaca_eval"]
    assert time.monotonic() - t0 > 3  # the server took seconds to come back; the run waited for it
    assert summary["judge"]["sent"] == 5 and summary["metrics"]["judge_parsed_rate"] == 1.0
    assert judge_server.requests_served() == 5  # a fresh server: exactly the five judgments
