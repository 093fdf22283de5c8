"""The data scripts on tiny local inputs: a fake hub folder for download_data, JSON Lines stand-ins for math12k,
a teacher served on 127.0.0.1 by vLLM's OpenAI-compatible server over the tiny model (started once per session),
the offline backend through utils.inference (HF engine), and hand-written teacher outputs for the equivalence filter.
"""

from __future__ import annotations

import csv
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
from conftest import free_port, has_vllm
from conftest import load_script as load_repo_script

from utils.drgrpo_grader import r1_zero_reward_fn
from utils.helper_fns import read_jsonl

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"


def load_script(name: str):
    return load_repo_script(f"play-scripts/data-scripts/{name}.py")


download, splits, traces, build = (
    load_script(n) for n in ("download_data", "make_math_splits", "generate_traces", "build_sft_dataset")
)


# ---------------------------------------------------------------------------------------------------------------
# download_data.py


def write_records(path: Path, records: list[dict], as_array: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        if as_array:  # the published MATH files are JSON arrays named .jsonl
            json.dump(records, f)
        else:
            f.writelines(json.dumps(r) + "\n" for r in records)


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def make_fake_hub(root: Path, subsets: tuple[str, ...]) -> Path:
    """A folder with the dataset repo's layout and the published record counts (tiny records)."""
    trace = {"problem": "p", "reasoning_trace": " r </think> <answer> 1 </answer>", "expected_answer": "1"}
    if "sft-reason" in subsets:
        write_records(root / "sft-reason/sft_gpt-oss-120b_filtered.jsonl", [trace] * 3496, as_array=True)
        write_records(root / "sft-reason/sft_gpt-oss-120b.jsonl", [trace] * 4836)
        write_records(root / "sft-reason/val.jsonl", [{"problem": "p", "expected_answer": "1"}] * 5000, as_array=True)
    if "sft-instruct" in subsets:
        pair = {"prompt": "hi", "response": "hello"}
        write_records(root / "sft-instruct/train.jsonl", [pair] * 100_000)
        write_records(root / "sft-instruct/test.jsonl", [pair] * 1_000)
        write_records(root / "sft-instruct/sample_train.jsonl", [pair] * 1_000)
    if "eval" in subsets:
        ev = root / "sft-instruct/eval"
        write_records(ev / "gsm8k/test.jsonl", [{"question": "q", "answer": "a #### 1"}] * 1319)
        for i in range(57):  # 14,042 questions in 57 subject files, no header
            write_csv(ev / f"mmlu/test/subject{i:02d}_test.csv", [["q", "a", "b", "c", "d", "A"]] * (246 + (i < 20)))
        write_csv(ev / "mmlu/dev/subject00_dev.csv", [["q", "a", "b", "c", "d", "A"]] * 5)
        sst = [["id", "harm_area", "prompts_final"]] + [["1", "x", "p"]] * 100
        write_csv(ev / "simple_safety_tests/simple_safety_tests.csv", sst)
        write_records(ev / "alpaca_eval/alpaca_eval.jsonl", [{"instruction": "i", "output": "o"}] * 805)
        (ev / "alpaca_eval/configs").mkdir(parents=True)
        (ev / "alpaca_eval/configs/configs.yaml").write_text("annotator: {}\n")
    return root


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory) -> Path:
    return make_fake_hub(tmp_path_factory.mktemp("hub"), ("sft-reason", "sft-instruct", "eval"))


def run_download(hub: Path, out: Path, *flags: str) -> dict:
    return download.main(download.parse_args(["--source", str(hub), "--out-dir", str(out), *flags]))


def test_download_only_verifies_and_skips_complete_files(fake_hub, tmp_path):
    out = tmp_path / "data"
    first = run_download(fake_hub, out, "--only", "sft-reason", "eval")
    eval_dir = fake_hub / "sft-instruct/eval"
    eval_files = sorted(p.relative_to(fake_hub).as_posix() for p in eval_dir.rglob("*") if p.is_file())
    assert sorted(first["fetched"]) == sorted(download.SUBSETS["sft-reason"]["files"] + eval_files)
    assert first["checks"] == [
        "ok  sft-reason/sft_gpt-oss-120b_filtered.jsonl: 3,496 records",
        "ok  sft-reason/sft_gpt-oss-120b.jsonl: 4,836 records",
        "ok  sft-reason/val.jsonl: 5,000 records",
        "ok  sft-instruct/eval/gsm8k/test.jsonl: 1,319 records",
        "ok  sft-instruct/eval/*mmlu*test*.csv (57 files): 14,042 records",  # the dev file is not counted
        "ok  sft-instruct/eval/simple_safety_tests/simple_safety_tests.csv: 100 records",
        "ok  sft-instruct/eval/alpaca_eval/alpaca_eval.jsonl: 805 records",
    ]
    assert (out / "sft-reason/val.jsonl").read_bytes() == (fake_hub / "sft-reason/val.jsonl").read_bytes()
    assert not (out / "sft-instruct/train.jsonl").exists()  # not selected by --only

    second = run_download(fake_hub, out, "--only", "sft-reason", "eval")
    assert second["fetched"] == [] and len(second["skipped"]) == len(first["fetched"])

    (out / "sft-reason/val.jsonl").write_text("[]")  # a damaged copy: its size no longer matches
    third = run_download(fake_hub, out, "--only", "sft-reason")
    assert third["fetched"] == ["sft-reason/val.jsonl"]
    assert len(read_jsonl(out / "sft-reason/val.jsonl")) == 5000


def test_download_keeps_the_bundled_sample_file(fake_hub, tmp_path):
    out = tmp_path / "data"
    bundled = out / "sft-instruct/sample_train.jsonl"
    write_records(bundled, [{"prompt": "bundled", "response": "sample"}] * 3)
    before = bundled.read_bytes()
    result = run_download(fake_hub, out, "--only", "sft-instruct")
    assert sorted(result["fetched"]) == sorted(download.SUBSETS["sft-instruct"]["files"])
    assert bundled.read_bytes() == before
    assert len(read_jsonl(out / "sft-instruct/sample_train_1k.jsonl")) == 1000
    assert "ok  sft-instruct/train.jsonl: 100,000 records" in result["checks"]


def test_download_reports_wrong_counts_and_missing_keys(tmp_path):
    hub = make_fake_hub(tmp_path / "hub", ("sft-reason",))
    val = json.loads((hub / "sft-reason/val.jsonl").read_text())
    write_records(hub / "sft-reason/val.jsonl", val[:-1], as_array=True)
    records = read_jsonl(hub / "sft-reason/sft_gpt-oss-120b.jsonl")
    del records[6]["expected_answer"]
    write_records(hub / "sft-reason/sft_gpt-oss-120b.jsonl", records)
    with pytest.raises(SystemExit) as info:
        run_download(hub, tmp_path / "data", "--only", "sft-reason")
    message = str(info.value)
    assert "sft-reason/val.jsonl: 4,999 records in 1 file(s), expected 5,000" in message
    assert "sft_gpt-oss-120b.jsonl:7: record has no 'expected_answer'" in message
    assert "filtered" not in message  # the intact file passed


def test_download_names_what_the_source_lacks(tmp_path):
    hub = make_fake_hub(tmp_path / "hub", ("sft-reason",))
    (hub / "sft-reason/val.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"subset 'sft-reason' lacks \['sft-reason/val.jsonl'\]"):
        run_download(hub, tmp_path / "data", "--only", "sft-reason")
    make_fake_hub(hub, ("eval",))
    (hub / "sft-instruct/eval/gsm8k/test.jsonl").rename(hub / "sft-instruct/eval/gsm8k/main.jsonl")
    with pytest.raises(SystemExit, match="no downloaded file matches sft-instruct/eval/\\*gsm8k"):
        run_download(hub, tmp_path / "data", "--only", "eval")


# ---------------------------------------------------------------------------------------------------------------
# make_math_splits.py


def make_splits(out: Path) -> dict:
    return splits.main(splits.parse_args([
        "--math12k-files", str(FIXTURES / "math12k_train.jsonl"), str(FIXTURES / "math12k_test.jsonl"),
        "--val-file", str(FIXTURES / "math_val.jsonl"), "--output", str(out),
    ]))  # fmt: skip


def test_math_splits_remove_val_problems_after_normalization(tmp_path):
    out = tmp_path / "train_problems.jsonl"
    stats = make_splits(out)
    assert stats == {"math12k": 7, "removed_in_val": 3, "val_problems": 4, "val_not_in_math12k": 1, "duplicates": 1,
                     "written": 3}  # fmt: skip
    assert read_jsonl(out) == [
        {"problem": "What is $1+1$?", "expected_answer": "2"},
        {"problem": "How many primes are less than 10?", "expected_answer": "4"},
        {"problem": "What is 12 + 35?", "expected_answer": "47"},
    ]


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("Compute $\\dfrac{1}{2} + \\dfrac{1}{4}$.", "Compute $\\frac{1}{2}+\\frac{1}{4}$.", True),
        ("Find $x$ if $\\left(x-1\\right)^2 = 0$.", "Find $x$ if $(x - 1)^2=0$.", True),
        ("Let $a\\,=\\!b$.\n\nFind $a$.", "Let $a=b$. Find $a$.", True),
        ("What is $1+1$?", "What is $1+2$?", False),
        ("Find $\\left|x\\right|$.", "Find $\\leftarrow$.", False),  # \left must not eat \leftarrow
    ],
)
def test_problem_normalization(a, b, same):
    assert (splits.normalize_problem(a) == splits.normalize_problem(b)) is same


def test_math_splits_name_the_bad_record(tmp_path):
    bad = tmp_path / "math12k.jsonl"
    write_records(bad, [{"problem": "ok", "answer": "1"}, {"problem": "no answer here"}])
    with pytest.raises(ValueError, match=r"math12k.jsonl:2: record has no 'expected_answer'"):
        splits.main(splits.parse_args(["--math12k-files", str(bad), "--val-file", str(FIXTURES / "math_val.jsonl"),
                                       "--output", str(tmp_path / "out.jsonl")]))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# build_sft_dataset.py


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think> a </think> <answer> 5 </answer>", (" a </think> <answer> 5 </answer>", "5")),
        ("<think>\na\nb\n</think>\n\n<answer>\\boxed{5}</answer>\nDone.",
         (" a\nb </think> <answer> \\boxed{5} </answer>", "\\boxed{5}")),
        (" a </think> <answer> 5 </answer>", (" a </think> <answer> 5 </answer>", "5")),  # r1_zero completion
        ("Sure. <think> a </think> <answer> 5 </answer>", (" a </think> <answer> 5 </answer>", "5")),
        ("<think> a <answer> 5 </answer>", (" a </think> <answer> 5 </answer>", "5")),  # unclosed think: closed
        ("a\n<answer>5</answer>", (" a </think> <answer> 5 </answer>", "5")),  # no think tags at all
        ("", (None, "empty_output")),
        (None, (None, "empty_output")),
        ("<think> a </think> the answer is 5", (None, "no_answer_tag")),
        ("<think> a </think> <answer> 5", (None, "unclosed_answer")),
        ("<think> a </think> <answer>  </answer>", (None, "empty_answer")),
        ("<think></think><answer> 5 </answer>", (None, "empty_reasoning")),
        ("<think> a <answer> 4 </answer> </think> <answer> 5 </answer>", (None, "stray_tags")),
        ("<think> a </think> </think> <answer> 5 </answer>", (None, "stray_tags")),
    ],
)
def test_rewrite_r1_zero(text, expected):
    assert build.rewrite_r1_zero(text) == expected
    if expected[0] is not None:
        assert r1_zero_reward_fn(expected[0], "5")["reward"] == 1.0  # the grader reads the rewritten format


def run_build(tmp_path: Path, *traces: Path, per_problem: str = "all") -> tuple[dict, list[dict], list[dict]]:
    full, filtered = tmp_path / f"full_{per_problem}.jsonl", tmp_path / f"filtered_{per_problem}.jsonl"
    stats = build.main(build.parse_args(["--traces", *map(str, traces), "--output-full", str(full),
                                         "--output-filtered", str(filtered),
                                         "--per-problem", per_problem]))  # fmt: skip
    return stats, read_jsonl(full), read_jsonl(filtered)


def test_build_keeps_equivalent_answers_and_counts_drops(tmp_path):
    stats, full, filtered = run_build(tmp_path, FIXTURES / "teacher_traces.jsonl", FIXTURES / "published_traces.json")
    assert stats == {
        "samples": 14, "problems": 5, "problems_solved": 5, "kept_full": 7, "kept_filtered": 6,
        "dropped": {"empty_answer": 1, "empty_output": 1, "empty_reasoning": 1, "finish_reason=length": 1,
                    "no_answer_tag": 1, "stray_tags": 1, "unclosed_answer": 1},
        "dropped_from_filtered": {"incorrect": 1},
        "finish_reason_missing_assumed_finished": 2, "exact_string_match": 3, "per_problem": "all",
    }  # fmt: skip
    assert json.loads((tmp_path / "filtered_all.stats.json").read_text()) == stats
    by_key = {(r["problem_id"], r["sample_index"]): r for r in filtered}
    # The published filter (exact string match) dropped these; math equivalence keeps them.
    half = by_key[("half", 0)]
    assert (half["extracted_answer"], half["expected_answer"]) == ("\\frac{1}{2}", "0.5")
    assert half["reasoning_trace"] == " Half of one is one divided by two. </think> <answer> \\frac{1}{2} </answer>"
    assert (by_key[("half", 1)]["reasoning_trace"]
            == " Divide 1 by 2. </think> <answer> \\boxed{\\dfrac{1}{2}} </answer>")
    assert ("half", 2) not in by_key and {(r["problem_id"], r["sample_index"]) for r in full} >= set(by_key)
    assert next(r for r in full if r["sample_index"] == 2 and r["problem_id"] == "half")["correct"] is False
    assert any(r["extracted_answer"] == "\\frac34" and r["expected_answer"] == "0.75" for r in filtered)
    for r in filtered:
        assert r1_zero_reward_fn(r["reasoning_trace"], r["expected_answer"])["reward"] == 1.0
        assert set(r) >= {"problem", "reasoning_trace", "expected_answer", "extracted_answer", "correct", "source"}


def test_build_one_trace_per_problem(tmp_path):
    stats, full, filtered = run_build(tmp_path, FIXTURES / "teacher_traces.jsonl", per_problem="one")
    assert stats["dropped_from_filtered"] == {"extra_correct_sample": 1, "incorrect": 1}
    assert sorted((r["problem_id"], r["sample_index"]) for r in filtered) == [("add", 0), ("cos", 5), ("half", 0)]
    assert len(full) == 5


def test_build_names_the_bad_record(tmp_path):
    bad = tmp_path / "traces.jsonl"
    write_records(bad, [{"problem": "p", "expected_answer": "1", "text": "x"}, {"expected_answer": "1", "text": "y"}])
    with pytest.raises(SystemExit, match=r"traces.jsonl:2: record has no 'problem'"):
        run_build(tmp_path, bad)


@pytest.mark.parametrize("flag", ["--output-full", "--output-filtered", "--stats"])
def test_build_refuses_an_output_that_is_an_input(tmp_path, flag):
    traces = tmp_path / "traces.jsonl"
    shutil.copy(FIXTURES / "teacher_traces.jsonl", traces)
    before = traces.read_bytes()
    argv = ["--traces", str(traces), "--output-full", str(tmp_path / "full.jsonl"),
            "--output-filtered", str(tmp_path / "filtered.jsonl")]
    argv += [flag, str(tmp_path / "." / "traces.jsonl")]  # the same file by another spelling; later flags win
    with pytest.raises(SystemExit, match=rf"{flag} .*is an input \(--traces"):
        build.main(build.parse_args(argv))
    assert traces.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces.jsonl"]  # nothing written


def test_build_refuses_two_outputs_on_one_file(tmp_path):
    with pytest.raises(SystemExit, match="--output-filtered .*the same file as --output-full"):
        build.main(build.parse_args(["--traces", str(FIXTURES / "teacher_traces.jsonl"), "--output-full",
                                     str(tmp_path / "x.jsonl"), "--output-filtered", str(tmp_path / "x.jsonl")]))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# generate_traces.py: the openai backend against vLLM's server, the offline backend through utils.inference


@pytest.fixture(scope="session")
def teacher_url(tiny_qwen_dir, tmp_path_factory):
    """vLLM's OpenAI-compatible server over the tiny model on 127.0.0.1 (~40 s to start on a busy 2-core CPU)."""
    if not has_vllm():
        pytest.skip("vLLM is not installed")
    port = free_port()
    log_path = tmp_path_factory.mktemp("teacher_server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # conftest's in-process setting is for offline engines
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_qwen_dir),
           "--served-model-name", "tiny-teacher", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8", "--disable-log-stats",
           "--chat-template", str(FIXTURES / "chat_template.jinja"), "--uvicorn-log-level", "warning"]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the engine-core child goes too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def generate(problems: Path, out: Path, *flags: str) -> dict:
    return traces.main(traces.parse_args(["--problems", str(problems), "--output", str(out), "--max-tokens", "8",
                                          *flags]))  # fmt: skip


def keys_of(path: Path) -> list[tuple[str, int]]:
    return sorted((r["problem_id"], r["sample_index"]) for r in read_jsonl(path))


def test_generate_openai_resumes_without_repeating_requests(teacher_url, tmp_path):
    problems = tmp_path / "problems.jsonl"
    make_splits(problems)
    out = tmp_path / "traces.jsonl"
    server = ["--base-url", teacher_url, "--model", "tiny-teacher", "--max-concurrency", "4"]
    flags = [*server, "--k", "2"]

    first = generate(problems, out, *flags)
    assert first["run"] == {"requests": 6, "cached": 0, "sent": 6, "failed": 0}
    records = read_jsonl(out)
    ids = {traces.problem_id(p["problem"]) for p in read_jsonl(problems)}
    assert keys_of(out) == sorted((pid, j) for pid in ids for j in range(2))
    for r in records:
        assert (isinstance(r["text"], str) and r["finish_reason"] in ("stop", "length")
                and r["teacher"] == "tiny-teacher")
    cache = [json.loads(line) for line in (tmp_path / "traces.jsonl.cache.jsonl").read_text().splitlines()]
    assert sorted(c["request"]["seed"] for c in cache) == [0, 0, 0, 1, 1, 1]  # sample j asks with seed + j
    assert all(c["request"]["messages"][0]["content"].startswith("Solve the math problem below") for c in cache)
    assert json.loads((tmp_path / "traces.jsonl.config.json").read_text())["temperature"] == 0.6

    # Interrupted: the last two records never made it to disk, and the write of a third was cut mid-line.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:20])
    resumed = generate(problems, out, *flags)
    assert resumed["run"] == {"requests": 2, "cached": 2, "sent": 0, "failed": 0}  # answers came from the cache
    assert keys_of(out) == sorted((pid, j) for pid in ids for j in range(2))
    by_key = lambda r: (r["problem_id"], r["sample_index"])  # noqa: E731
    assert sorted(read_jsonl(out)[4:], key=by_key) == sorted(records[4:], key=by_key)  # the same answers as before

    more = generate(problems, out, *server, "--k", "3")
    assert more["run"]["sent"] == 3 and more["output"]["samples"] == 9
    assert generate(problems, out, *server, "--k", "3")["run"]["requests"] == 0  # complete: nothing to do

    with pytest.raises(SystemExit, match=r"other settings \(temperature: 0.6 -> 1.0\)"):
        generate(problems, out, *server, "--k", "3", "--temperature", "1.0")

    # The tiny model writes no tags: every sample is counted under a drop reason and the run still finishes.
    stats, full, filtered = run_build(tmp_path, out)
    assert stats["samples"] == 9 and full == [] and filtered == []
    assert sum(stats["dropped"].values()) == 9


def test_generate_openai_completions_counts_unparseable_outputs(teacher_url, tmp_path):
    problems = tmp_path / "problems.jsonl"
    make_splits(problems)
    out = tmp_path / "traces.jsonl"
    # Stop strings on common letters make the random model finish with "stop" and untagged text.
    result = generate(problems, out, "--base-url", teacher_url, "--model", "tiny-teacher", "--api", "completions",
                      "--max-tokens", "32", "--stop", " ", "e", "a", "t")  # fmt: skip (the API allows 4)
    assert result["output"]["samples"] == 3 and result["output"]["with_answer_tags"] == 0
    assert result["output"]["finish_reason"].get("stop", 0) >= 1
    cache = [json.loads(line) for line in (tmp_path / "traces.jsonl.cache.jsonl").read_text().splitlines()]
    assert all(c["request"]["prompt"].endswith("Assistant: <think>") for c in cache)  # the r1_zero prompt, raw
    stats, full, _ = run_build(tmp_path, out)
    assert full == [] and sum(stats["dropped"].values()) == 3
    assert sum(v for k, v in stats["dropped"].items() if not k.startswith("finish_reason=")) >= 1


def test_generate_openai_rejected_requests_are_counted_not_written(teacher_url, tmp_path):
    problems = tmp_path / "problems.jsonl"
    make_splits(problems)
    out = tmp_path / "traces.jsonl"
    # The OpenAI API (and vLLM's server) accepts at most 4 stop strings: every request gets HTTP 400.
    flags = ["--base-url", teacher_url, "--model", "tiny-teacher", "--stop", "a", "b", "c", "d", "e"]
    result = generate(problems, out, *flags)
    assert result["run"] == {"requests": 3, "cached": 0, "sent": 3, "failed": 3}
    assert not out.exists() or read_jsonl(out) == []
    assert generate(problems, out, *flags)["run"]["sent"] == 3  # rejected requests are not cached: asked again


def test_generate_openai_unreachable_names_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(SystemExit, match=rf"{url}/models: cannot connect"):
        generate(FIXTURES / "math_val.jsonl", tmp_path / "t.jsonl", "--base-url", url, "--model", "m",
                 "--max-retries", "0")  # fmt: skip


def test_generate_offline_backend_resumes(tiny_qwen_dir, tmp_path):
    out = tmp_path / "traces.jsonl"
    flags = ["--backend", "vllm", "--engine", "hf", "--model", str(tiny_qwen_dir), "--k", "2", "--dtype", "float32"]
    first = generate(FIXTURES / "math_val.jsonl", out, *flags)
    assert first["run"]["sent"] == 8 and first["output"]["samples"] == 8
    assert set(json.loads((tmp_path / "traces.jsonl.config.json").read_text())["prompt"].splitlines()[-1:]) == {
        "Assistant: <think>"
    }  # no chat template on the tiny tokenizer: the raw r1_zero prompt
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]))
    second = generate(FIXTURES / "math_val.jsonl", out, *flags)
    assert second["run"]["sent"] == 3 and second["output"]["samples"] == 8
    assert len(read_jsonl(out)) == 8


@pytest.mark.parametrize("own_prompt", [True, False])
def test_generate_auto_does_not_frame_a_prompt_file_twice(tiny_qwen_dir, tmp_path, capsys, own_prompt):
    """A checkpoint this repo trained carries its training prompt as its chat template: with that prompt as
    --prompt-file, auto sends it raw (the same text the chat template gives the bare question); any other chat
    template is applied over the prompt file as before."""
    from transformers import AutoTokenizer

    from utils.serving import set_training_chat_template

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    prompt = Path("data/demo/demo.prompt").read_text()
    set_training_chat_template(tok, prompt if own_prompt else "Q: {question}\nA:", "{question}", False, False)
    tok.save_pretrained(model)
    question = "What is 12 + 34?"
    bare = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    assert (bare == prompt.replace("{question}", question)) == own_prompt
    out = tmp_path / "traces.jsonl"
    generate(FIXTURES / "math_val.jsonl", out, "--backend", "vllm", "--engine", "hf", "--model", str(model),
             "--prompt-file", "data/demo/demo.prompt", "--dtype", "float32")  # fmt: skip
    chosen = "raw" if own_prompt else "chat"
    assert f"prompt format: {chosen} (" in capsys.readouterr().out
    assert json.loads((tmp_path / "traces.jsonl.config.json").read_text())["prompt_rendered_as"] == chosen


def test_generate_rejects_flags_of_the_other_backend(tmp_path):
    with pytest.raises(SystemExit, match="--prompt-format applies to --backend vllm"):
        generate(FIXTURES / "math_val.jsonl", tmp_path / "t.jsonl", "--model", "m", "--prompt-format", "raw")


@pytest.mark.parametrize("argv", [["--num-train", "-5"], ["--num-val", "0"]])
def test_demo_data_refuses_non_positive_counts(tmp_path, argv, capsys):
    demo = load_script("make_demo_data")
    with pytest.raises(SystemExit) as e:
        demo.main(["--out-dir", str(tmp_path / "demo"), *argv])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_data_counts_and_disjoint_splits(tmp_path):
    demo = load_script("make_demo_data")
    demo.main(["--out-dir", str(tmp_path), "--num-train", "30", "--num-val", "5"])
    train, val = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "val.jsonl")
    assert (len(train), len(val)) == (30, 5)
    assert not {r["problem"] for r in train} & {r["problem"] for r in val}
    assert all(int(r["expected_answer"]) == eval(r["problem"][8:-1]) for r in train)  # "What is a + b?"
