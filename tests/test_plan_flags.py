"""--plan-only and --gpu-memory-gib in both trainers: exit status, the printed block, and a run that cannot fit
stopping before any weight or tokenizer is read (the model folders here hold only config.json)."""

from __future__ import annotations

import json

import pytest
from test_memory_plan import LLAMA_8B, QWEN_15B

import train_sft_instruct as TI
import train_sft_reason as TR


@pytest.fixture()
def model_dirs(tmp_path):
    dirs = {}
    for name, config in (("llama8b", LLAMA_8B), ("qwen15b", QWEN_15B)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))  # no weights, no tokenizer: a plan must not need them
        dirs[name] = d
    return dirs


def _exit_code(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().out


def test_instruct_plan_only_8b_one_gpu_does_not_fit_eight_does(model_dirs, tmp_path, capsys, monkeypatch):
    argv = ["--model", str(model_dirs["llama8b"]), "--plan-only", "--gpu-memory-gib", "80", "--output-dir",
            str(tmp_path / "out"), "--train-file", str(tmp_path / "not-downloaded-yet.jsonl")]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out = _exit_code(lambda a: TI.main(TI.parse_args(a)), argv, capsys)
    assert code == 3
    assert "8.03B parameters, precision mixed, 1 GPU(s)" in out and "DOES NOT FIT" in out
    assert "options that fit" in out and "torchrun with 8 GPUs (FSDP)" in out
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun's variable: `WORLD_SIZE=8 python ... --plan-only` plans 8 GPUs
    code, out = _exit_code(lambda a: TI.main(TI.parse_args(a)), argv, capsys)
    assert code == 0 and "8 GPU(s) with FSDP" in out and ": fits" in out
    assert not (tmp_path / "out").exists()  # a plan writes nothing


def test_reason_plan_only_15b_counts_vllm_and_its_sleep(model_dirs, tmp_path, capsys):
    base = ["--model", str(model_dirs["qwen15b"]), "--plan-only", "--output-dir", str(tmp_path / "out")]
    code, out = _exit_code(lambda a: TR.main(TR.parse_args(a)), base + ["--gpu-memory-gib", "80"], capsys)
    assert code == 0 and "1.54B parameters" in out and "in-loop evaluation" in out and "vLLM engine (awake)" not in out
    code, out = _exit_code(lambda a: TR.main(TR.parse_args(a)),
                           base + ["--gpu-memory-gib", "60", "--no-vllm-sleep", "--gpu-memory-utilization", "0.5"],
                           capsys)  # fmt: skip
    assert code == 3 and "vLLM engine (awake)" in out and "DOES NOT FIT" in out and "--vllm-sleep" in out


def test_plan_only_without_a_gpu_or_a_size_says_what_to_give(model_dirs, tmp_path):
    with pytest.raises(SystemExit, match="give --gpu-memory-gib"):
        TR.main(TR.parse_args(["--model", str(model_dirs["qwen15b"]), "--plan-only", "--device", "cpu"]))


def test_run_that_cannot_fit_stops_before_loading(model_dirs, tmp_path, capsys):
    """Not --plan-only: the run prints the plan and stops with the numbers; the folder holds no weights, so getting
    past the plan would fail differently."""
    with pytest.raises(SystemExit, match=r"needs ~\d+\.\d GiB per GPU and the GPU has 16\.0 GiB; stopped before"):
        TR.main(TR.parse_args(["--preset", "demo", "--model", str(model_dirs["qwen15b"]), "--gpu-memory-gib", "16",
                               "--output-dir", str(tmp_path / "out"), "--run-name", "r"]))
    assert "memory plan per GPU" in capsys.readouterr().out
    assert not (tmp_path / "out" / "r" / "checkpoints").exists()
