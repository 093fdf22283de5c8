"""play-scripts/upload_to_hub.py: the dry run lists exactly what would go up and the card; resume state never does."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import load_script

upload = load_script("play-scripts/upload_to_hub.py")


@pytest.fixture()
def run(tmp_path, tiny_qwen_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.checkpoints import save_checkpoint

    run_dir = tmp_path / "results" / "demo"
    run_dir.mkdir(parents=True)
    train = tmp_path / "train.jsonl"
    train.write_text('{"problem": "1+1", "response": "2"}\n')
    config = {"model": "Qwen/Qwen2.5-Math-1.5B", "train_file": str(train), "lr": 1e-4, "prompt_template": "r1_zero"}
    (run_dir / "config.json").write_text(json.dumps(config))
    rows = [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": 2.0, "eval/math/accuracy": 0.25},
            {"step": 3, "train/loss": 1.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    opt = torch.optim.AdamW(model.parameters())
    # bf16 served weights: trainer_state/ then holds the fp32 weights too, beside the optimizer and RNG states
    save_checkpoint(run_dir / "checkpoints", 2, model, tok, opt, {"step": 2}, save_dtype="bfloat16")
    return run_dir


def test_dry_run_lists_model_files_and_card_never_trainer_state(run, capsys):
    folder = run / "checkpoints" / "latest"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    resume_files = {p.name for p in (folder / "trainer_state").iterdir()}
    assert resume_files == {"trainer_state.pt", "model.safetensors"}
    result = upload.main(upload.parse_args([str(folder), "--repo-id", "me/demo", "--dry-run"]))
    assert not any(name.startswith("trainer_state") for name in result["files"])
    expected = sorted(before) + ["README.md"]  # every top-level file: the served model, tokenizer, configs
    assert sorted(result["files"]) == sorted(expected) and "model.safetensors" in result["files"]
    assert result["private"] is True
    card = result["card"]
    assert "base_model: Qwen/Qwen2.5-Math-1.5B" in card
    assert "run `demo`, checkpoint at step 2" in card
    assert "| train/loss | 2 | 2 |" in card and "| eval/math/accuracy | 2 | 0.25 |" in card
    assert "| train/loss | 3 |" not in card  # metrics after the checkpoint's step are not this model's
    sha = __import__("hashlib").sha256((run.parent.parent / "train.jsonl").read_bytes()).hexdigest()
    assert sha in card and '"lr": 0.0001' in card
    out = capsys.readouterr().out
    assert "would upload to model me/demo (private)" in out and "trainer_state" not in out
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # read only


def test_upload_sends_one_commit_with_the_listed_files(run, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token):
            calls["token"] = token

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls["repo"] = (repo_id, repo_type, private, exist_ok)

        def create_commit(self, repo_id, operations, commit_message, repo_type):
            calls["paths"] = sorted(op.path_in_repo for op in operations)
            calls["message"] = commit_message
            return "https://hub.invalid/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = run / "checkpoints" / "latest"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="set HF_TOKEN"):
        upload.main(upload.parse_args([str(folder), "--repo-id", "me/demo"]))
    monkeypatch.setenv("HF_TOKEN", "secret")
    dry = upload.main(upload.parse_args([str(folder), "--repo-id", "me/demo", "--dry-run"]))
    upload.main(upload.parse_args([str(folder), "--repo-id", "me/demo"]))
    assert calls["token"] == "secret" and calls["repo"] == ("me/demo", "model", True, True)
    assert calls["paths"] == sorted(dry["files"]) and not any("trainer_state" in p for p in calls["paths"])
    assert calls["message"] == "Upload demo step 2"


def test_refuses_what_is_not_a_model_folder(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        upload.main(upload.parse_args([str(tmp_path), "--repo-id", "me/x", "--dry-run"]))
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "notes.bin").write_bytes(b"x")
    result = upload.main(upload.parse_args([str(tmp_path), "--repo-id", "me/x", "--repo-type", "dataset", "--dry-run"]))
    assert result["files"] == ["data.jsonl", "README.md"]
