"""The shared flag module: one vocabulary across scripts, deprecated spellings kept as hidden aliases, speed checks."""

import pytest

import evaluate_reason
import train_sft_instruct
import train_sft_reason
from utils.cli_flags import check_speed_flags

ALIASES = [  # (script, old spelling, new spelling, a value)
    (train_sft_instruct, "--seq-length", "--max-seq-len", "64"),
    (train_sft_instruct, "--template", "--prompt-template", "data/demo/demo.prompt"),
    (evaluate_reason, "--output", "--output-dir", "results/elsewhere"),
    (evaluate_reason, "--prompt", "--prompt-template", "data/demo/demo.prompt"),
]


@pytest.mark.parametrize("script, old, new, value", ALIASES)
def test_deprecated_spelling_parses_as_the_new_flag_and_says_so_once(script, old, new, value, capsys):
    base = ["--preset", "demo"] if script is train_sft_instruct else []
    assert vars(script.parse_args([*base, old, value])) == vars(script.parse_args([*base, new, value]))
    assert capsys.readouterr().err.splitlines() == [f"{old} is deprecated: use {new}"]


def test_min_lr_ratio_becomes_the_absolute_min_lr(capsys):
    old = train_sft_reason.parse_args(["--preset", "demo", "--lr", "2e-3", "--min-lr-ratio", "0.25"])
    new = train_sft_reason.parse_args(["--preset", "demo", "--lr", "2e-3", "--min-lr", "5e-4"])
    assert old.min_lr == pytest.approx(5e-4)
    assert vars(old) == {**vars(new), "min_lr": old.min_lr}  # no leftover ratio key in config.json
    said = capsys.readouterr().err.splitlines()
    assert said == ["--min-lr-ratio is deprecated: use --min-lr (absolute: --lr x ratio)"]


@pytest.mark.parametrize("script, old", [(train_sft_reason, "--min-lr-ratio")] + [a[:2] for a in ALIASES])
def test_deprecated_spellings_are_hidden_from_usage(script, old, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert f"[{old} " not in usage and f"[{old}]" not in usage


@pytest.mark.parametrize("flag", ["--max-seq-len", "--min-lr", "--prompt-template", "--output-dir", "--lr-schedule"])
def test_both_trainers_spell_a_concept_the_same(flag):
    for script in (train_sft_reason, train_sft_instruct):
        assert flag.lstrip("-").replace("-", "_") in vars(script.parse_args(["--preset", "demo"])), script.__name__


def test_evaluate_reason_reads_the_renamed_keys_of_a_yaml_config(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("benchmark: math\nprompt: data/demo/demo.prompt\noutput: results/x\n")
    args = evaluate_reason.parse_args(["--config", str(old)])
    assert args.prompt_template == "data/demo/demo.prompt" and args.output_dir == "results/x"
    assert "prompt" not in vars(args) and "output" not in vars(args)
    assert capsys.readouterr().err.splitlines() == [
        f"--config {old}: key 'prompt' is deprecated: use 'prompt_template'",
        f"--config {old}: key 'output' is deprecated: use 'output_dir'",
    ]


@pytest.mark.parametrize(
    "device, attention, chunk_size, fused, liger, message",
    [
        ("cpu", "varlen", 0, True, False, "--fused-lm-head works chunk by chunk"),
        ("cuda:0", "varlen", 0, True, False, "--fused-lm-head works chunk by chunk"),
        ("cpu", "flex", 0, False, False, "--attention flex needs CUDA"),
        ("cpu", "varlen", 0, False, True, "--liger needs CUDA"),
        ("cuda:0", "flex", 64, True, True, None),
        ("cpu", "sdpa", 64, True, False, None),
    ],
)  # fmt: skip
def test_speed_flag_checks_take_the_values(device, attention, chunk_size, fused, liger, message):
    if message is None:
        check_speed_flags(device, attention, chunk_size, fused, liger)
    else:
        with pytest.raises(SystemExit, match=message):
            check_speed_flags(device, attention, chunk_size, fused, liger)
