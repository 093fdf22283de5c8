"""train_sft_reason.py end to end on the demo data: learning, resume, faults."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import train_sft_reason as T


def _rows(run_dir: Path, prefix: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if any(k.startswith(prefix) for k in r)}


def _args(tmp_path, *extra):
    return T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--eval-every", "-1", *extra])


def test_short_run_learns_changes_every_parameter_and_logs_finite_numbers(tmp_path):
    out = T.main(_args(tmp_path, "--run-name", "a", "--max-steps", "12", "--micro-batch-size", "16"))
    run = Path(out["run_dir"])
    train = _rows(run, "train/")
    assert sorted(train) == list(range(1, 13))
    for row in train.values():
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("train/"))
    assert train[12]["train/nll_per_token"] < 0.6 * train[1]["train/nll_per_token"]
    config = json.loads((run / "config.json").read_text())
    assert config["total_steps"] == 12 and config["train_examples"] == 3000 and config["dropped_overlong"] == 0
    from safetensors.torch import load_file

    before = load_file(run / "base_model/model.safetensors")
    after = load_file(run / "checkpoints/step_000012/model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    common = ["--max-steps", "6", "--save-every", "3", "--keep-last", "5", "--micro-batch-size", "4",
              "--gradient-accumulation-steps", "2"]
    full = Path(T.main(_args(tmp_path, "--run-name", "full", *common))["run_dir"])
    broken = Path(T.main(_args(tmp_path, "--run-name", "broken", *common))["run_dir"])
    shutil.rmtree(broken / "checkpoints" / "step_000006")  # as if killed right after the step-3 checkpoint
    (broken / "checkpoints" / "latest").unlink()
    (broken / "checkpoints" / "latest").symlink_to("step_000003")
    T.main(_args(tmp_path, "--run-name", "broken", "--resume", *common))
    a, b = _rows(full, "train/"), _rows(broken, "train/")
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-6)


def test_packed_run_matches_padded_run(tmp_path):
    common = ["--max-steps", "3", "--micro-batch-size", "4", "--gradient-accumulation-steps", "2"]
    a = _rows(Path(T.main(_args(tmp_path, "--run-name", "pad", *common))["run_dir"]), "train/")
    b = _rows(Path(T.main(_args(tmp_path, "--run-name", "pack", "--packing", "bfd", "--pack-tokens", "256",
                                *common))["run_dir"]), "train/")
    for step in (1, 2, 3):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-5)
        assert b[step]["train/tokens"] < a[step]["train/tokens"]  # no padding


def test_overlong_examples_are_dropped_and_counted(tmp_path):
    out = T.main(_args(tmp_path, "--run-name", "long", "--max-steps", "1", "--max-seq-len", "67"))
    config = json.loads((Path(out["run_dir"]) / "config.json").read_text())
    assert 0 < config["dropped_overlong"] < 3000
    assert config["train_examples"] == 3000 - config["dropped_overlong"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = '{"problem": "1+1", "response": " 2 </think> <answer> 2 </answer>", "expected_answer": "2"}'
    bad.write_text(good + "\n{oops\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: malformed JSON"):
        T.main(_args(tmp_path, "--train-file", str(bad)))
    missing = tmp_path / "missing_key.jsonl"
    missing.write_text('{"problem": "1+1", "expected_answer": "2"}\n')
    with pytest.raises(SystemExit, match=r"missing_key.jsonl:1: record has no .response."):
        T.main(_args(tmp_path, "--train-file", str(missing)))


def test_unwritable_output_dir_fails_before_model_load(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="--output-dir"):
        T.main(_args(blocker))


def test_nan_loss_stops_and_names_last_good_checkpoint(tmp_path, monkeypatch):
    import utils.training as training

    real = training.train_step
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise training.NonFiniteLossError("non-finite loss nan / grad norm nan")
        return real(*a, **k)

    monkeypatch.setattr(training, "train_step", flaky)
    with pytest.raises(SystemExit, match=r"step 3: non-finite .* Last good checkpoint: .*step_000002"):
        T.main(_args(tmp_path, "--run-name", "nan", "--max-steps", "4", "--save-every", "2"))


def test_flag_conflicts_are_rejected():
    with pytest.raises(SystemExit, match="--resume needs --run-name"):
        T.check_args(T.parse_args(["--preset", "demo", "--resume", "--run-name", ""]))
    with pytest.raises(SystemExit, match="--pack-tokens"):
        T.check_args(T.parse_args(["--preset", "demo", "--packing", "bfd", "--pack-tokens", "64"]))


def test_demo_preset_learns_addition_with_in_loop_validation(tmp_path):
    """The README's main job with fewer evals: accuracy goes from 0 to most problems, graded in-loop via the engine."""
    out = T.main(T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--eval-every", "500",
                               "--val-size", "100"]))
    history = {h["step"]: h for h in out["history"]}
    assert sorted(history) == [0, 500]
    assert history[0]["accuracy"] < 0.05
    assert history[500]["accuracy"] >= 0.5 and history[500]["format_accuracy"] >= 0.9
    assert history[500]["teacher_forced_loss"] < 0.5 * history[0]["teacher_forced_loss"]
    samples = [json.loads(x) for x in (Path(out["run_dir"]) / "samples" / "step_00500.jsonl").read_text().splitlines()]
    assert len(samples) == 20 and all(s["response"].rstrip().endswith("</answer>") for s in samples)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_sampled_in_loop_eval_after_resume_equals_the_uninterrupted_run(tmp_path):
    """T = 1 validation through vLLM: each val problem's sample is seeded by (seed, its val-file position), so the
    evaluations after a resume draw what the uninterrupted run drew. Before, vLLM drew from its engine seed, whose
    stream a resumed run restarts: the step-4 samples differed (checked with request_keys=None)."""
    common = ["--max-steps", "4", "--save-every", "2", "--keep-last", "5", "--eval-every", "2", "--val-size", "24",
              "--temperature", "1.0", "--max-tokens", "24", "--engine", "vllm"]
    full = Path(T.main(_args(tmp_path, "--run-name", "full", *common))["run_dir"])
    broken = Path(T.main(_args(tmp_path, "--run-name", "broken", *common))["run_dir"])
    shutil.rmtree(broken / "checkpoints" / "step_000004")  # as if killed right after the step-2 checkpoint
    (broken / "checkpoints" / "latest").unlink()
    (broken / "checkpoints" / "latest").symlink_to("step_000002")
    (broken / "samples" / "step_00004.jsonl").write_text("stale\n")  # the resumed eval must rewrite it
    T.main(_args(tmp_path, "--run-name", "broken", "--resume", *common, "--eval-every", "4"))
    a, b = _rows(full, "eval/"), _rows(broken, "eval/")
    assert sorted(a) == sorted(b) == [0, 2, 4]
    for step in (0, 2, 4):
        assert b[step]["eval/math/accuracy"] == a[step]["eval/math/accuracy"]
    samples = lambda run: (run / "samples" / "step_00004.jsonl").read_text()  # noqa: E731
    assert samples(broken) == samples(full)  # the same sampled text, token for token
    history = [json.loads(x) for x in (broken / "config_history.jsonl").read_text().splitlines()]
    assert [h["changes"] for h in history] == [{"eval_every": [2, 4], "resume": [False, True]}]  # safe, recorded
