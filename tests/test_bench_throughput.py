"""The throughput benchmark on the tiny shape: packed vs padded loss, fair token counts for TRL (not speed)."""

import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parent.parent


def _load():
    return load_script("play-scripts/bench-scripts/bench_train_throughput.py")


def test_bench_tiny_shape_packed_equals_padded(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.json"
    names = ["padded", "packed+chunked+liger", "packed-mask", "packed", "packed+chunked", "packed+fused",
             "packed-flex+fused"]
    rows = bench.main(["--shape", "tiny", "--steps", "3", "--examples-per-step", "6", "--length-scale", "0.1",
                       "--max-len", "256", "--pack-tokens", "400", "--device", "cpu", "--output", str(out),
                       "--configs", ",".join(names)])
    assert [r["config"] for r in rows] == ["padded", "packed-mask", "packed", "packed+chunked", "packed+fused"]
    printed = capsys.readouterr().out
    assert "skip packed-flex+fused: flex needs CUDA" in printed and "skip packed+chunked+liger: liger needs" in printed
    for r in rows[1:]:
        # three steps of AdamW on the same examples: same objective, same trajectory
        assert r["first_loss"] == pytest.approx(rows[0]["first_loss"], abs=1e-5)
        assert r["last_loss"] == pytest.approx(rows[0]["last_loss"], abs=1e-4)
        assert r["tokens_per_s"] > 0
    saved = json.loads(out.read_text())
    assert saved["meta"]["shape"] == "tiny" and len(saved["results"]) == 5
    assert set(saved["meta"]["skipped"]) == {"packed-flex+fused", "packed+chunked+liger"}


def test_bench_runs_liger_rows_last():
    """Liger patches transformers' modules process-wide: once a Liger row has run, no later row may be one that
    should be measured without it. Checked on every config, in many request orders: the run order holds each
    requested config once, no Liger row precedes a plain one, and otherwise the requested order is kept."""
    import random

    bench = _load()
    tables = {**bench.CONFIGS, **bench.TRL_CONFIGS}
    # Liger is on for a row when our step gets liger=True or TRL gets use_liger_kernel=True (the flags the rows pass)
    liger = {name for name, cfg in tables.items() if cfg.get("liger") or cfg.get("use_liger_kernel")}
    assert liger and liger != set(tables)  # both kinds exist, so the property below is not vacuous
    rng = random.Random(0)
    for _ in range(50):
        names = rng.sample(sorted(tables), rng.randint(1, len(tables)))
        order = bench.run_order(names)
        assert sorted(order) == sorted(names)
        uses = [n in liger for n in order]
        assert uses == sorted(uses), order  # all plain rows, then all Liger rows
        for group in (liger, set(tables) - liger):
            assert [n for n in order if n in group] == [n for n in names if n in group]


def test_bench_synthetic_lengths_follow_the_issue():
    bench = _load()
    exs = bench.synthetic_examples(400, 1000, 0, 2048)
    prompt_lens = [int((~e["response_mask"]).sum()) + 1 for e in exs]
    total = [len(e["input_ids"]) + 1 for e in exs]
    assert min(prompt_lens) >= 60 and max(prompt_lens) <= 300
    assert max(total) <= 2048
    assert 650 < sum(total) / len(total) < 900  # the issue's mean sequence is 773 tokens


def test_unshifted_labels_mask_the_prompt_and_match_the_shifted_example():
    bench = _load()
    ex = bench.synthetic_examples(1, 1000, 3, 2048, 0.1)[0]
    full, labels = bench.unshifted(ex)
    n_prompt = int((~ex["response_mask"]).sum()) + 1
    assert len(full) == len(labels) == len(ex["input_ids"]) + 1
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == full[n_prompt:]
    # the model predicts labels[t + 1] at position t: the same targets and mask as our shifted example
    assert full[:-1] == ex["input_ids"].tolist()
    assert [lab != -100 for lab in labels[1:]] == ex["response_mask"].tolist()


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


TRL_ARGS = ["--shape", "tiny", "--steps", "3", "--warmup-steps", "1", "--examples-per-step", "4",
            "--length-scale", "0.1", "--max-len", "256", "--pack-tokens", "512", "--trl-micro-batch-size", "2",
            "--trl-grad-accum", "2", "--device", "cpu"]  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (requirements-dev.txt pins it)")
def test_bench_trl_rows_count_every_real_token_once(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.json"
    rows = bench.main([*TRL_ARGS, "--configs", "padded,trl-default,trl-packing,trl-packing-nogc,trl-packing-liger",
                       "--output", str(out)])
    by_name = {r["config"]: r for r in rows}
    # Liger needs CUDA: skipped with a printed reason, never silently
    assert "trl-packing-liger" not in by_name and "skip trl-packing-liger:" in capsys.readouterr().out
    for name in ("trl-default", "trl-packing", "trl-packing-nogc"):
        r = by_name[name]
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        assert abs(r["first_loss"] - math.log(1000)) < 0.1  # random weights: about ln(vocab)
        assert r["steps"] == 3
        # one epoch over the pool: the tokens TRL's batches held are exactly the pool's, each example once
        pool = bench.synthetic_examples(r["examples"], 1000, 0, 256, 0.1)
        assert r["documents"] == r["examples"]
        assert r["tokens_total"] == sum(len(e["input_ids"]) + 1 for e in pool)
    # padded rows hold one example each; packed rows hold ~256 tokens, so packing sees more examples per step
    assert by_name["trl-default"]["examples"] == 3 * 2 * 2
    assert by_name["trl-packing"]["examples"] > by_name["trl-default"]["examples"]
    # gradient checkpointing recomputes, it does not change the numbers
    assert by_name["trl-packing-nogc"]["last_loss"] == pytest.approx(by_name["trl-packing"]["last_loss"], rel=1e-5)
    saved = json.loads(out.read_text())
    assert [r["config"] for r in saved["results"]] == ["padded", "trl-default", "trl-packing", "trl-packing-nogc"]
    # the versions recorded are the installed ones, whatever they are, and None for a package that is missing
    assert saved["meta"]["versions"] == {dist: _installed_version(dist) for dist in
                                         ("transformers", "trl", "accelerate", "datasets", "liger-kernel")}
    assert saved["meta"]["versions"]["trl"] is not None


def test_gpu_script_names_only_known_configs():
    """gpu_bench.sh runs where every minute counts: a misspelt config there would only show on the GPU."""
    import re

    bench = _load()
    script = (REPO / "play-scripts/bench-scripts/gpu_bench.sh").read_text()
    lists = re.findall(r"--configs (\S+)", script)
    assert len(lists) == 4
    names = [n for lst in lists for n in lst.split(",")]
    assert set(names) <= set(bench.CONFIGS) | set(bench.TRL_CONFIGS)
    # every config is timed on the full shape in some stage
    full = [n for lst in lists[1:] for n in lst.split(",")]
    assert set(full) == set(bench.CONFIGS) | set(bench.TRL_CONFIGS)


def test_compile_warmup_leaves_the_weights_alone(tmp_path):
    """Compiled rows warm up at lr 0 before timing: their losses must still equal the eager row's."""
    bench = _load()
    rows = bench.main(["--shape", "tiny", "--steps", "2", "--examples-per-step", "4", "--length-scale", "0.1",
                       "--max-len", "256", "--pack-tokens", "400", "--device", "cpu", "--compile-warmup-steps", "1",
                       "--configs", "packed+fused,packed+fused+compile"])
    assert rows[1]["first_loss"] == pytest.approx(rows[0]["first_loss"], abs=1e-5)
    assert rows[1]["last_loss"] == pytest.approx(rows[0]["last_loss"], abs=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (requirements-dev.txt pins it)")
def test_gpu_script_dry_run_on_cpu(tmp_path):
    """gpu_bench.sh end to end with DRY_RUN=1 (tiny shape on the CPU): every stage runs and writes its JSON, so the
    one GPU call cannot fail on the script itself."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, DRY_RUN="1", RESULTS=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "play-scripts/bench-scripts/gpu_bench.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = _load()
    ran, skipped = set(), set()
    for stage in ("check", "core", "liger", "extra"):
        saved = json.loads(next(tmp_path.glob(f"train-throughput-{stage}-cpu-dry-run-*.json")).read_text())
        ran |= {r["config"] for r in saved["results"] if "error" not in r}
        skipped |= set(saved["meta"]["skipped"])
    cuda_only = {n for n, c in bench.CONFIGS.items() if c.get("liger") or c["attention"] == "flex"}
    assert skipped == cuda_only | {"trl-packing-liger"}
    assert ran == (set(bench.CONFIGS) | set(bench.TRL_CONFIGS)) - skipped
    lm_head = json.loads(next(tmp_path.glob("lm-head-cpu-dry-run-*.json")).read_text())
    assert [r["path"] for r in lm_head["results"]] == ["plain", "chunked", "fused"]


def test_liger_rows_are_skipped_with_the_reason_when_liger_cannot_load(monkeypatch):
    """On the GPU a carried Liger wheel can fail to import; its rows must be skipped with the reason, not abort the
    stage (apply_liger_kernels exits the process)."""
    bench = _load()
    cfg = bench.CONFIGS["packed+fused+liger"]
    if importlib.util.find_spec("liger_kernel") is None:
        assert "not installed" in bench.our_skip_reason(cfg, "cuda")

    def broken(name):
        raise RuntimeError("triton version mismatch")

    monkeypatch.setattr(bench.importlib, "import_module", broken)
    assert bench.our_skip_reason(cfg, "cuda") == "liger_kernel does not import: RuntimeError: triton version mismatch"
    assert bench.our_skip_reason(bench.CONFIGS["packed+fused"], "cuda") == ""


def test_a_failing_config_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """One GPU call measures everything: a config that crashes (a kernel failing on the card) is recorded with its
    error, later configs still run and save, and the run exits non-zero at the end."""
    bench = _load()
    real = bench.run_config

    def flaky(name, *args):
        if name == "packed":
            raise RuntimeError("kernel failed")
        return real(name, *args)

    monkeypatch.setattr(bench, "run_config", flaky)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match=r"configs that failed: \['packed'\]"):
        bench.main(["--shape", "tiny", "--steps", "2", "--examples-per-step", "4", "--length-scale", "0.1",
                    "--max-len", "256", "--pack-tokens", "400", "--device", "cpu", "--output", str(out),
                    "--configs", "padded,packed,packed+fused"])
    saved = json.loads(out.read_text())["results"]
    assert [r["config"] for r in saved] == ["padded", "packed", "packed+fused"]
    assert saved[1]["error"] == "RuntimeError: kernel failed" and "tokens_per_s" in saved[2]
    assert "RuntimeError: kernel failed" in capsys.readouterr().err


def test_lm_head_bench_paths_agree(tmp_path):
    """The loss-head benchmark's three paths give one loss and one gradient (fp32, small shape)."""
    mod = load_script("play-scripts/bench-scripts/bench_lm_head.py")
    out = tmp_path / "lm.json"
    rows = mod.main(["--device", "cpu", "--tokens", "48", "--hidden", "32", "--vocab", "300", "--chunk-size", "16",
                     "--repeats", "1", "--out", str(out)])
    assert [r["path"] for r in rows] == ["plain", "chunked", "fused"]
    assert all(r["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6) and r["max_grad_diff"] < 1e-6 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["versions"]["torch"] and saved["results"][2]["tokens_per_s"] > 0


def test_gpu_script_names_unmet_requirements_of_carried_wheels(tmp_path):
    """The wheels install with --no-deps: the script's check must print each requirement nothing installed meets."""
    import re
    import subprocess
    import sys
    import zipfile

    script = (REPO / "play-scripts/bench-scripts/gpu_bench.sh").read_text()
    check = re.search(r"<<'CHECK'[^\n]*\n(.*?)\nCHECK\n", script, re.S).group(1)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    metadata = ("Metadata-Version: 2.1\nName: fake\nVersion: 1.0\nRequires-Dist: pytest>=1\n"
                "Requires-Dist: no-such-package-sft>=2.0\nRequires-Dist: pytest<1\n"
                "Requires-Dist: no-such-extra-dep ; extra == 'dev'\n")
    with zipfile.ZipFile(wheels / "fake-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake-1.0.dist-info/METADATA", metadata)
    out = subprocess.run([sys.executable, "-c", check, str(wheels)], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    unmet = [line for line in out.stdout.splitlines() if line.startswith("unmet:")]
    assert len(unmet) == 2
    assert "no-such-package-sft>=2.0; installed: nothing" in unmet[0]
    assert "pytest<1; installed: " in unmet[1]
    assert "2 unmet" in out.stdout
