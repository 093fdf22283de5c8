"""Checkpoints: atomic save, the `latest` link, restore of weights and optimizer state, pruning."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from utils.post_train import tokenize_prompt_and_output
from utils.training import build_optimizer, train_step


def test_checkpoint_roundtrip_and_interrupted_save(model_and_batch, tmp_path, tiny_qwen_dir, monkeypatch):
    model, tok, prompts, outputs = model_and_batch
    opt = build_optimizer(model, 1e-2, 0.0)
    mb = tokenize_prompt_and_output(prompts, outputs, tok)
    train_step(model, opt, [mb], 1e-2)
    first = save_checkpoint(tmp_path, 1, model, tok, opt, {"step": 1}, keep_last=2)
    assert latest_checkpoint(tmp_path) == first
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "latest").resolve() == first.resolve()
    AutoModelForCausalLM.from_pretrained(tmp_path / "latest")  # the link is a model path for HF/vLLM/eval scripts
    train_step(model, opt, [mb], 1e-2)

    # a crash inside the save (here: writing trainer_state.pt) must leave step 1 as the usable latest
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, tok, opt, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "step_000002").exists()

    # restore step 1 into a fresh model: weights and optimizer state match what was saved
    fresh = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    fresh_opt = build_optimizer(fresh, 1e-2, 0.0)
    state = load_checkpoint(first, fresh, fresh_opt)
    assert state == {"step": 1}
    saved = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    for (n, p), q in zip(fresh.named_parameters(), saved.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)
    assert fresh_opt.state_dict()["state"][0]["step"].item() == 1

    # keep_last prunes older complete checkpoints
    for s in (3, 4, 5):
        save_checkpoint(tmp_path, s, model, tok, opt, {"step": s}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004", "step_000005"]
