"""Checkpoints: atomic save, the `latest` link, restore of weights and optimizer state, pruning."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.checkpoints import latest_checkpoint, load_checkpoint, resume_state_file, save_checkpoint
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
    with pytest.raises(SystemExit, match=r"checkpoint at step 2 not saved: disk full .*partial folder was removed\. "
                                         r"Last complete checkpoint: .*step_000001"):
        save_checkpoint(tmp_path, 2, model, tok, opt, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "step_000002").exists() and not (tmp_path / ".step_000002.tmp").exists()

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


def _saved(model_and_batch, root):
    model, tok, prompts, outputs = model_and_batch
    opt = build_optimizer(model, 1e-2, 0.0)
    train_step(model, opt, [tokenize_prompt_and_output(prompts, outputs, tok)], 1e-2)
    return model, opt, save_checkpoint(root, 1, model, tok, opt, {"step": 1}), save_checkpoint(root, 2, model, tok, opt,
                                                                                              {"step": 2})


class _Marker:
    """Unpickling this object would create a file: the proof that a checkpoint ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_tampered_trainer_state_runs_no_code(model_and_batch, tmp_path):
    model, opt, _, second = _saved(model_and_batch, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    blob = torch.load(resume_state_file(second), weights_only=True)
    blob["payload"] = _Marker(str(marker))
    torch.save(blob, resume_state_file(second))
    with pytest.raises(SystemExit, match=r"trainer_state.pt: refused to load"):
        load_checkpoint(second, model, opt)
    assert not marker.exists()


def test_rng_state_loads_safely_and_restores_every_generator(model_and_batch, tmp_path):
    import random

    import numpy as np

    from utils.checkpoints import rng_state

    model, opt, _, _ = _saved(model_and_batch, tmp_path / "ckpt")
    first = save_checkpoint(tmp_path / "ckpt", 3, model, model_and_batch[1], opt, {"step": 3})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())  # the draws right after the save
    assert all(not hasattr(v, "dtype") or isinstance(v, torch.Tensor) for v in rng_state()["numpy"])  # no ndarray
    load_checkpoint(first, model, opt)  # weights_only load, then every generator back to the save
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_old_numpy_rng_layout_still_loads(model_and_batch, tmp_path):
    import numpy as np

    model, opt, first, _ = _saved(model_and_batch, tmp_path / "ckpt")
    blob = torch.load(resume_state_file(first), weights_only=True)
    blob["rng"]["numpy"] = np.random.get_state()  # how checkpoints of earlier versions stored it
    torch.save(blob, resume_state_file(first))
    expected = np.random.get_state()[1].copy()
    np.random.rand(5)
    load_checkpoint(first, model, opt)
    assert (np.random.get_state()[1] == expected).all()


def test_truncated_weights_name_the_file_and_the_other_checkpoints(model_and_batch, tmp_path):
    model, opt, first, second = _saved(model_and_batch, tmp_path / "ckpt")
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SystemExit, match=r"step_000002/model.safetensors: unreadable weights .*damaged\. "
                                         r"Other complete checkpoints in .*ckpt: step_000001"):
        load_checkpoint(second, model, opt)


def test_sharded_resume_state_with_a_tampered_metadata_file_runs_no_code(tmp_path):
    """torch.distributed.checkpoint unpickles `.metadata` with plain pickle: our allowlist reads it first."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from utils.distributed import check_dcp_metadata

    folder = tmp_path / "dcp"
    dcp.save({"model": {"w": torch.ones(3)}}, checkpoint_id=str(folder), no_dist=True)
    check_dcp_metadata(folder)  # what DCP itself writes passes
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(SystemExit, match=r"\.metadata: refused to load \((builtins|io)\.open is not allowed\)"):
        check_dcp_metadata(folder)
    assert not marker.exists()
