"""Checkpoints both train scripts write and resume from: save, load, find the latest, prune, RNG states.

A checkpoint is an HF `save_pretrained` folder (vLLM loads it) plus `trainer_state.pt` (optimizer, RNG states,
step); it is written to a temp folder and renamed, so a crash mid-save never leaves a half checkpoint as latest.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch


def rng_state() -> dict:
    """Every RNG the training loop may draw from, as tensors and plain Python values only, so that the state loads
    with `torch.load(weights_only=True)` (numpy's key array is stored as an int64 tensor)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older checkpoints stored the array
        np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants the nested tuples random.getstate gave (a JSON or pickle round trip may make lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_trainer_state(path: str | Path) -> dict:
    """Read `trainer_state.pt` without running code from it: `weights_only=True` admits tensors, containers and plain
    values (plus numpy's array reconstruction, which older checkpoints of this repo used for the numpy RNG).

    Raises:
        SystemExit: naming the file when it holds anything else (a tampered or foreign file is never unpickled).
    """
    import pickle

    allowed = []
    try:
        import numpy as np

        from numpy._core.multiarray import _reconstruct

        allowed = [np.dtype, np.ndarray, _reconstruct, type(np.dtype("uint32"))]
    except ImportError:
        pass
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise SystemExit(f"{path}: refused to load: it holds objects other than tensors and plain values ({first}). "
                         f"Checkpoints written by this repo never do; a file that does could run code when "
                         f"unpickled") from None  # fmt: skip


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying module of a `torch.compile`d model (its state-dict keys carry no `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    keep_last: int = 2,
    state_dict: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write `ckpt_root/step_XXXXXX/` atomically and point the `ckpt_root/latest` symlink at it; keep the newest
    `keep_last`.

    The folder is a complete HF model + tokenizer (loadable by vLLM and `from_pretrained`), or for a PEFT model its
    adapter in PEFT's format (`PeftModel.save_pretrained`; see `utils.lora.save_merged_model` for a full folder), plus
    `trainer_state.pt` with the optimizer state, RNG states and `trainer_state` (step, data position, ...).
    Under FSDP, rank 0 passes the consolidated `state_dict` and `optimizer_state` (see `utils.distributed`).
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        torch.save(
            {
                "optimizer": optimizer_state,
                "rng": rng_state(),
                "trainer_state": trainer_state,
            },
            tmp / "trainer_state.pt",
        )
    except OSError as e:  # a full disk, a quota: say so, and leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        raise SystemExit(f"checkpoint at step {step} not saved: {e.strerror or e} while writing {tmp}; the partial "
                         f"folder was removed. Last complete checkpoint: {last or 'none'}") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # `latest` is a relative symlink, so `--model <run>/checkpoints/latest` works for HF, vLLM and the eval scripts;
    # replacing a symlink with os.replace is atomic.
    latest_tmp = root / ".latest.tmp"
    if latest_tmp.is_symlink() or latest_tmp.exists():
        latest_tmp.unlink()
    os.symlink(final.name, latest_tmp)
    os.replace(latest_tmp, root / "latest")
    if keep_last > 0:
        done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").exists())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `latest` points to, or else the newest complete `step_*` folder; None if there is none."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_symlink():
        cand = root / os.readlink(pointer)
        if (cand / "trainer_state.pt").exists():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, dist_info=None
) -> dict:
    """Load weights, optimizer state and RNG states from a checkpoint folder; returns its `trainer_state` dict.

    With FSDP (`dist_info.enabled`) every rank reads the consolidated files and loads its shard. A LoRA checkpoint
    (an `adapter_config.json` folder, from a PEFT `model`) restores the adapter weights only (`utils.lora`).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "adapter_config.json").exists():  # a LoRA run: the folder holds the adapter, not the full weights
        from utils.lora import load_adapter_state

        load_adapter_state(model, path)
        blob = load_trainer_state(path / "trainer_state.pt")
        if optimizer is not None and blob["optimizer"] is not None:
            optimizer.load_state_dict(blob["optimizer"])
        set_rng_state(blob["rng"])
        return blob["trainer_state"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights in checkpoint")
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors raises its own error type for a truncated or corrupt file
            others = [p.name for p in sorted(path.parent.glob("step_*")) if p.resolve() != path.resolve()
                      and (p / "trainer_state.pt").exists()]  # fmt: skip
            raise SystemExit(f"{f}: unreadable weights ({type(e).__name__}: {e}); the checkpoint is damaged. "
                             f"Other complete checkpoints in {path.parent}: {', '.join(others) or 'none'}") from None
    target = unwrap_model(model)
    blob = load_trainer_state(path / "trainer_state.pt")
    if dist_info is not None and dist_info.enabled:
        from utils.distributed import load_full_state

        if getattr(target.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # save_pretrained drops the tied copy
        load_full_state(target, optimizer, state, blob["optimizer"])
    else:
        missing, unexpected = target.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(target.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"{path}: checkpoint does not match the model "
                               f"(missing {missing}, unexpected {unexpected})")
        if optimizer is not None and blob["optimizer"] is not None:
            optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return blob["trainer_state"]
