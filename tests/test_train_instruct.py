"""train_sft_instruct.py end to end on a tiny Llama: learning, resume, and FSDP over 2 gloo processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

import train_sft_instruct as T

REPO = Path(__file__).resolve().parent.parent


def _rows(run_dir: Path, prefix: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if any(k.startswith(prefix) for k in r)}


def _args(tmp_path, *extra):
    return T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                         *extra])


def _changed_from_base(run_dir: Path, checkpoint: Path) -> dict[str, bool]:
    """For every tensor of the tiny base model: did the checkpoint change it? (Same names and shapes asserted.)"""
    from safetensors.torch import load_file

    base, saved = load_file(run_dir / "base_model" / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert saved.keys() == base.keys()
    assert all(saved[k].shape == base[k].shape for k in base)
    return {k: not torch.equal(saved[k], base[k]) for k in base}


def test_short_run_lowers_test_loss_and_writes_config(tmp_path):
    out = T.main(_args(tmp_path, "--run-name", "a", "--max-steps", "30", "--eval-every", "15"))
    run = Path(out["run_dir"])
    evals = _rows(run, "eval/")
    assert sorted(evals) == [0, 15, 30]
    assert evals[30]["eval/test_loss"] < evals[0]["eval/test_loss"] - 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["total_steps"] == 30 and config["packing"] == "concat"
    ckpt = run / "checkpoints" / "step_000030"
    assert (run / "checkpoints" / "latest").resolve() == ckpt.resolve()
    assert torch.load(ckpt / "trainer_state" / "trainer_state.pt", weights_only=False)["trainer_state"] == {"step": 30}
    changed = _changed_from_base(run, ckpt)
    assert all(changed.values()), [k for k, c in changed.items() if not c]  # the trained weights were saved


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    common = ["--max-steps", "6", "--eval-every", "3", "--save-every", "3", "--keep-last", "5", "--packing", "doc",
              "--mask-prompt"]
    full = Path(T.main(_args(tmp_path, "--run-name", "full", *common))["run_dir"])
    broken = Path(T.main(_args(tmp_path, "--run-name", "broken", *common))["run_dir"])
    # simulate a crash right after the step-3 checkpoint: later checkpoints never happened
    shutil.rmtree(broken / "checkpoints" / "step_000006")
    (broken / "checkpoints" / "latest").unlink()
    (broken / "checkpoints" / "latest").symlink_to("step_000003")
    T.main(_args(tmp_path, "--run-name", "broken", "--resume", *common))
    a, b = _rows(full, "train/"), _rows(broken, "train/")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # rows after the checkpoint were replaced, not duplicated
    for step in range(1, 7):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-6)
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], abs=1e-5)


@pytest.mark.parametrize("lm_head", [[], ["--chunk-size", "64"], ["--chunk-size", "64", "--fused-lm-head"]])
def test_fsdp_two_gloo_processes_match_one_process(tmp_path, lm_head):
    """2 ranks x micro 2 x GA 1 sees the same 4 rows per step as 1 rank x micro 2 x GA 2: same losses. With a chunked
    or fused lm head too (the embeddings, norm and head belong to FSDP's root unit, gathered only by the root's
    forward)."""
    single = T.main(_args(tmp_path, "--run-name", "single", "--max-steps", "3", "--eval-every", "3",
                          "--micro-batch-size", "2", "--gradient-accumulation-steps", "2", "--packing", "doc"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "train_sft_instruct.py"), "--preset", "demo", "--output-dir", str(tmp_path), "--cache-dir",
           str(tmp_path / "cache"), "--run-name", "fsdp", "--max-steps", "3", "--eval-every", "3",
           "--micro-batch-size", "2", "--gradient-accumulation-steps", "1", "--packing", "doc", *lm_head]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _rows(Path(single["run_dir"]), "train/"), _rows(tmp_path / "fsdp", "train/")
    for step in (1, 2, 3):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-5)
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-4)
    ea, eb = _rows(Path(single["run_dir"]), "eval/"), _rows(tmp_path / "fsdp", "eval/")
    assert eb[3]["eval/test_loss"] == pytest.approx(ea[3]["eval/test_loss"], abs=1e-5)
    # the consolidated checkpoint written by rank 0 loads as a plain HF model: every weight full-size (no shards),
    # trained, and the same weights as the one-process run's up to float noise (small against what training moved)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fsdp_ckpt = tmp_path / "fsdp" / "checkpoints" / "step_000003"
    single_ckpt = Path(single["run_dir"]) / "checkpoints" / "step_000003"
    model, info = AutoModelForCausalLM.from_pretrained(fsdp_ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert any(_changed_from_base(tmp_path / "fsdp", fsdp_ckpt).values())
    fsdp_sd, single_sd = load_file(fsdp_ckpt / "model.safetensors"), load_file(single_ckpt / "model.safetensors")
    base_sd = load_file(tmp_path / "fsdp" / "base_model" / "model.safetensors")
    torch.testing.assert_close(model.get_input_embeddings().weight, fsdp_sd["model.embed_tokens.weight"])
    gap = torch.cat([(fsdp_sd[k] - single_sd[k]).flatten() for k in base_sd]).norm()
    moved = torch.cat([(single_sd[k] - base_sd[k]).flatten() for k in base_sd]).norm()
    assert gap < 0.01 * moved, (gap, moved)


def test_missing_data_file_fails_before_model_load(tmp_path):
    with pytest.raises(SystemExit, match="--train-file .*nope.jsonl: file not found"):
        T.main(_args(tmp_path, "--train-file", str(tmp_path / "nope.jsonl")))


def _torchrun(tmp_path, run_name, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "train_sft_instruct.py"), "--preset", "demo", "--output-dir", str(tmp_path), "--cache-dir",
           str(tmp_path / "cache"), "--run-name", run_name, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fsdp_sharded_state_resumes_on_two_ranks_and_on_one(tmp_path):
    """FSDP checkpoints keep model + AdamW state as per-rank shards (torch.distributed.checkpoint) beside the
    consolidated served weights; a run cut after step 2 resumes on 2 ranks and on 1 process (4 rows/step either
    way) with the uninterrupted run's losses."""
    common = ["--max-steps", "4", "--eval-every", "-1", "--save-every", "2", "--keep-last", "5", "--packing", "doc",
              "--micro-batch-size", "2"]
    _torchrun(tmp_path, "full", *common, "--gradient-accumulation-steps", "1")
    ckpt = tmp_path / "full" / "checkpoints" / "step_000002"
    assert any((ckpt / "trainer_state" / "dcp").glob("*.distcp"))  # shards, written by each rank
    blob = torch.load(ckpt / "trainer_state" / "trainer_state.pt", weights_only=False)
    assert blob["optimizer"] is None and blob["sharded"]  # no gathered optimizer state
    for name in ("two", "one"):
        shutil.copytree(tmp_path / "full", tmp_path / name, symlinks=True)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step_000004")
        (tmp_path / name / "checkpoints" / "latest").unlink()
        (tmp_path / name / "checkpoints" / "latest").symlink_to("step_000002")
    _torchrun(tmp_path, "two", "--resume", *common, "--gradient-accumulation-steps", "1")
    # one process takes 2 accumulation steps for the same 4 rows a step: a deliberate change, allowed by name
    T.main(_args(tmp_path, "--run-name", "one", "--resume", *common, "--gradient-accumulation-steps", "2",
                 "--allow-config-change", "gradient_accumulation_steps,world_size"))
    full = _rows(tmp_path / "full", "train/")
    for name in ("two", "one"):
        resumed = _rows(tmp_path / name, "train/")
        assert sorted(resumed) == [1, 2, 3, 4]
        for step in (3, 4):
            assert resumed[step]["train/loss"] == pytest.approx(full[step]["train/loss"], abs=1e-5), (name, step)
            assert resumed[step]["train/grad_norm"] == pytest.approx(full[step]["train/grad_norm"], rel=1e-4)
