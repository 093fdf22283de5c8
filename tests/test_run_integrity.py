"""Run integrity through the scripts, as a user meets it: each mistake gets a clear refusal and loses nothing.

Every case runs the script's main() (or its CLI), asserts the exit message, and that every file that existed before
is byte-identical afterwards. Cases that need a trained run use a fake run folder: the refusals happen before any
model loads. The module-level cases (lock, config history, tampered checkpoints, grader time limits) have their own
tests in test_run_dir.py, test_checkpoints.py and test_grader_limits.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import snapshot_files

import evaluate_reason as E
import train_sft_instruct as I
import train_sft_reason as T

REPO = Path(__file__).resolve().parents[1]


def _reason(tmp_path, *extra):
    return T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path / "out"), *extra])


def _instruct(tmp_path, *extra):
    return I.parse_args(["--preset", "demo", "--output-dir", str(tmp_path / "out"), *extra])


def _fake_run(tmp_path, name="demo", **config) -> Path:
    """A run folder as a finished demo run leaves it (config.json from the same flags, metrics, a checkpoint)."""
    run = tmp_path / "out" / name
    (run / "checkpoints" / "step_000005").mkdir(parents=True)
    args = vars(_reason(tmp_path, "--run-name", name))
    (run / "config.json").write_text(json.dumps({**args, "device": "cpu", **config}))
    (run / "metrics.jsonl").write_text('{"step": 5, "train/loss": 0.5}\n')
    (run / "checkpoints" / "step_000005" / "trainer_state.pt").write_bytes(b"state")
    return run


# ---------------------------------------------------------------------------------------------- data loss and mixing
def test_rerun_with_an_existing_run_name_is_refused_and_loses_nothing(tmp_path):
    run = _fake_run(tmp_path)
    before = snapshot_files(run)
    with pytest.raises(SystemExit) as e:
        T.main(_reason(tmp_path, "--max-steps", "1"))
    assert str(run) in str(e.value) and "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert snapshot_files(run) == before


def test_instruct_rerun_is_refused_too(tmp_path):
    run = _fake_run(tmp_path, name="instruct_demo")
    before = snapshot_files(run)
    with pytest.raises(SystemExit, match="already holds a run"):
        I.main(_instruct(tmp_path))
    assert snapshot_files(run) == before


def test_a_second_run_on_a_locked_folder_is_refused_at_once(tmp_path):
    run = tmp_path / "out" / "busy"
    run.mkdir(parents=True)
    held = tmp_path / "held"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from utils.run_dir import RunLock
        lock = RunLock({str(run)!r}).acquire()
        open({str(held)!r}, "w").write("1")
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(400):
            if held.exists():
                break
            time.sleep(0.05)
        with pytest.raises(SystemExit, match=rf"in use by another process \(pid {child.pid}"):
            T.main(_reason(tmp_path, "--run-name", "busy", "--max-steps", "1"))
    finally:
        child.kill()
        child.wait()
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused run wrote nothing


def test_resume_with_changed_settings_is_refused_naming_each(tmp_path):
    run = _fake_run(tmp_path)
    before = snapshot_files(run)
    with pytest.raises(SystemExit) as e:
        T.main(_reason(tmp_path, "--resume", "--lr", "0.01", "--micro-batch-size", "8"))
    message = str(e.value)
    assert "lr: 0.003 -> 0.01" in message and "micro_batch_size: 32 -> 8" in message
    assert "--allow-config-change lr,micro_batch_size" in message
    assert snapshot_files(run) == before


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", ".."])
def test_run_names_outside_the_output_dir_are_refused(tmp_path, name):
    with pytest.raises(SystemExit, match="--run-name .*plain folder name"):
        T.main(_reason(tmp_path, "--run-name", name))
    with pytest.raises(SystemExit, match="--run-name .*plain folder name"):
        I.main(_instruct(tmp_path, "--run-name", name))
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ numeric flags, silent no-ops
@pytest.mark.parametrize("script, flags, message", [
    ("reason", ["--eval-every", "0"], "--eval-every 0: must be >= 1, or -1 (never)"),
    ("reason", ["--warmup-ratio", "-1"], "--warmup-ratio -1.0: must be in [0, 1)"),
    ("reason", ["--val-size", "0"], "--val-size 0: must be >= 1, or -1 (all)"),
    ("reason", ["--lr", "0"], "--lr 0.0: must be > 0"),
    ("reason", ["--epochs", "0"], "--epochs 0.0: must be > 0, or -1"),
    ("reason", ["--temperature", "-0.5"], "--temperature -0.5: must be >= 0"),
    ("reason", ["--save-every", "0"], "--save-every 0: must be >= 1, or -1"),
    ("instruct", ["--eval-max-rows", "0"], "--eval-max-rows 0: must be >= 1, or -1 (all)"),
    ("instruct", ["--warmup-ratio", "1.5"], "--warmup-ratio 1.5: must be in [0, 1)"),
    ("instruct", ["--max-seq-len", "1"], "--max-seq-len 1: must be >= 2"),
])  # fmt: skip
def test_out_of_range_flags_fail_before_anything_is_written(tmp_path, script, flags, message):
    main, parse = (T.main, _reason) if script == "reason" else (I.main, _instruct)
    with pytest.raises(SystemExit) as e:
        main(parse(tmp_path, *flags))
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_evaluate_reason_checks_ranges_and_model_before_loading(tmp_path):
    base = ["--data", "data/demo/val.jsonl", "--prompt-template", "data/demo/demo.prompt",
            "--output-dir", str(tmp_path / "eval")]
    with pytest.raises(SystemExit, match="--top-p 0.0: must be in"):
        E.main(E.parse_args(["--model", "tiny-missing", "--top-p", "0", *base]))
    with pytest.raises(SystemExit, match="--model results: the folder has no config.json"):
        E.main(E.parse_args(["--model", "results", *base]))
    assert not (tmp_path / "eval").exists()


# --------------------------------------------------------------------------------------------- clear data errors
@pytest.mark.parametrize("record, message", [
    ({"problem": 7, "response": " a </think> <answer> 1 </answer>", "expected_answer": "1"},
     "bad.jsonl:1: the problem must be a non-empty string, got 7"),
    ({"problem": "1+0", "response": None, "expected_answer": "1"},
     "bad.jsonl:1: the response must be a non-empty string, got None"),
    ({"problem": "1+0", "response": " a </think> <answer> 1 </answer>", "expected_answer": None},
     "bad.jsonl:1: the answer must be a string or a list of strings, got None"),
])  # fmt: skip
def test_bad_training_records_name_file_line_and_field(tmp_path, record, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as e:
        T.main(_reason(tmp_path, "--train-file", str(bad), "--max-steps", "1"))
    assert str(e.value) == f"data error: {bad.parent}/{message}"


def test_a_val_record_with_a_null_answer_follows_the_evaluate_rule(tmp_path):
    """Training's validation and evaluate_reason.py apply one rule: a null answer is an error, not a wrong answer."""
    val = tmp_path / "val.jsonl"
    val.write_text('{"problem": "What is 1 + 1?", "expected_answer": "2"}\n{"problem": "2+2", "answer": null}\n')
    with pytest.raises(SystemExit, match=r"val.jsonl:2: the answer must be a string"):
        T.main(_reason(tmp_path, "--val-file", str(val), "--max-steps", "1"))
    with pytest.raises(ValueError, match=r"val.jsonl:2: the answer must be a string"):
        from utils.benchmarks.math import load_math_examples

        load_math_examples(val)


def test_instruct_records_missing_a_key_fail_the_same_with_the_tiny_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "no response"}\n')
    with pytest.raises(SystemExit, match=r"data error: .*bad.jsonl:2: record has no 'response' field"):
        I.main(_instruct(tmp_path, "--train-file", str(bad)))


def test_instruct_template_without_instruction_is_refused(tmp_path):
    template = tmp_path / "t.prompt"
    template.write_text("### Response:\n{response}")
    with pytest.raises(SystemExit, match=r"--prompt-template .*t.prompt: needs both \{instruction\} and \{response\}"):
        I.main(_instruct(tmp_path, "--prompt-template", str(template)))


@pytest.mark.parametrize("model, message", [
    ("results", "the folder has no config.json, so it is not a model folder"),
    ("no/such/folder", "no such folder"),
    ("README.md", "a file, not a model folder"),
])  # fmt: skip
def test_model_flag_that_is_not_a_model_is_refused_before_anything_is_written(tmp_path, model, message):
    with pytest.raises(SystemExit, match=f"--model {model}: {message}"):
        T.main(_reason(tmp_path, "--model", model))
    assert not (tmp_path / "out").exists()
