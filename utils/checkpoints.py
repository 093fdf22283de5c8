"""Checkpoints both train scripts write and resume from: save, load, find the latest, prune, RNG states.

A checkpoint is an HF `save_pretrained` folder (vLLM loads it, `upload_to_hub.py` uploads it) with weights in the
save dtype, plus a `trainer_state/` subfolder with what only resuming needs: `trainer_state.pt` (optimizer, RNG
states, step) and, when the saved weights are narrower than the trained ones, `model.safetensors` at training
precision. Checkpoints of the older layout (`trainer_state.pt` beside the weights) still resume. A checkpoint is
written to a temp folder and renamed, so a crash mid-save never leaves a half checkpoint as latest.
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


def load_trainer_state(path: str | Path, mmap: bool = False) -> dict:
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
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


RESUME_DIR = "trainer_state"  # the subfolder of a checkpoint that only resuming reads


def resume_state_file(path: str | Path) -> Path | None:
    """`trainer_state.pt` of a checkpoint folder, in the current layout (`trainer_state/trainer_state.pt`) or the
    older one (beside the weights); None when the folder has neither (not a complete checkpoint)."""
    for cand in (Path(path) / RESUME_DIR / "trainer_state.pt", Path(path) / "trainer_state.pt"):
        if cand.is_file():
            return cand
    return None


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
    save_dtype: str | None = None,
    sharded_state: str | Path | None = None,
) -> Path:
    """Write `ckpt_root/step_XXXXXX/` atomically and point the `ckpt_root/latest` symlink at it; keep the newest
    `keep_last`.

    The folder is a complete HF model + tokenizer (loadable by vLLM and `from_pretrained`), or for a PEFT model its
    adapter in PEFT's format (`PeftModel.save_pretrained`, in training precision; see `utils.lora.save_merged_model`
    for a full folder), plus `trainer_state/trainer_state.pt` with the optimizer state, RNG states and
    `trainer_state` (step, data position).
    Under FSDP, rank 0 passes the consolidated `state_dict` and `optimizer_state` (see `utils.distributed`).

    `save_dtype` ("bfloat16", "float16", "float32"; None = the model's own) is the dtype of the served weights, and
    config.json says so. When it is narrower than the trained weights, those are kept at full precision in
    `trainer_state/model.safetensors`, so a resume continues from the exact weights rather than rounded ones.
    The tokenizer is saved as it is: set its `chat_template` first (`utils.serving.set_training_chat_template`).

    `sharded_state`: a folder every FSDP rank wrote with `utils.distributed.save_sharded_state` (model and optimizer
    shards); it is moved into `trainer_state/dcp/` and replaces both the optimizer state in trainer_state.pt and the
    full-precision weights copy.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    target = unwrap_model(model)
    full = state_dict if state_dict is not None else target.state_dict()
    served = full
    if hasattr(target, "peft_config"):  # a LoRA adapter: small, saved as trained (no config.json to record a dtype)
        save_dtype = None
    if save_dtype is not None:
        from utils.serving import cast_state_dict

        served = cast_state_dict(full, save_dtype)
    narrowed = any(v.is_floating_point() and v.dtype != served[k].dtype for k, v in full.items())
    try:
        target.save_pretrained(tmp, state_dict=dict(served))  # a copy: it drops tied keys from its argument
        if save_dtype is not None:
            from utils.serving import ensure_generation_eos, write_config_dtype

            write_config_dtype(tmp, save_dtype)
            ensure_generation_eos(tmp, tokenizer.eos_token_id)
        tokenizer.save_pretrained(tmp)
        (tmp / RESUME_DIR).mkdir()
        if sharded_state is not None:
            os.replace(sharded_state, tmp / RESUME_DIR / "dcp")
            optimizer, optimizer_state = None, None
        elif narrowed:
            from safetensors.torch import save_file

            # tied weights share storage; safetensors refuses shared tensors, so each entry gets its own
            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in full.items()},
                      str(tmp / RESUME_DIR / "model.safetensors"))  # fmt: skip
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        torch.save(
            {
                "optimizer": optimizer_state,
                "rng": rng_state(),
                "trainer_state": trainer_state,
                "sharded": sharded_state is not None,
            },
            tmp / RESUME_DIR / "trainer_state.pt",
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
        done = sorted(p for p in root.glob("step_*") if resume_state_file(p) is not None)
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `latest` points to, or else the newest complete `step_*` folder; None if there is none."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_symlink():
        cand = root / os.readlink(pointer)
        if resume_state_file(cand) is not None:
            return cand
    done = sorted(p for p in root.glob("step_*") if resume_state_file(p) is not None)
    return done[-1] if done else None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, dist_info=None
) -> dict:
    """Load weights, optimizer state and RNG states from a checkpoint folder; returns its `trainer_state` dict.

    A checkpoint with `trainer_state/dcp/` (written under FSDP) loads model and optimizer from those shards, on any
    number of ranks. A LoRA checkpoint (an `adapter_config.json` folder, from a PEFT `model`) restores the adapter
    weights only (`utils.lora`). Otherwise weights come from `trainer_state/model.safetensors` when the checkpoint has
    it (full precision), else from the served files; with FSDP (`dist_info.enabled`) rank 0 reads them and
    broadcasts, and each rank keeps its shard.
    """
    from safetensors.torch import load_file

    path = Path(path)
    target = unwrap_model(model)
    if (path / "adapter_config.json").exists():  # a LoRA run: the folder holds the adapter, not the full weights
        from utils.lora import load_adapter_state

        load_adapter_state(model, path)
        blob = load_trainer_state(resume_state_file(path))
        if optimizer is not None and blob["optimizer"] is not None:
            optimizer.load_state_dict(blob["optimizer"])
        set_rng_state(blob["rng"])
        return blob["trainer_state"]
    if (path / RESUME_DIR / "dcp").is_dir():  # FSDP's sharded state: resharded to this run's ranks, one included
        from utils.distributed import load_sharded_state

        load_sharded_state(target, optimizer, path / RESUME_DIR / "dcp")
        blob = load_trainer_state(resume_state_file(path))
        set_rng_state(blob["rng"])
        return blob["trainer_state"]
    full_precision = path / RESUME_DIR / "model.safetensors"
    files = [full_precision] if full_precision.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights in checkpoint")
    sharded = dist_info is not None and dist_info.enabled
    reader = not sharded or dist_info.is_main  # under FSDP rank 0 reads and broadcasts; the others receive
    state = {}
    for f in files if reader else []:
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors raises its own error type for a truncated or corrupt file
            others = [p.name for p in sorted(path.parent.glob("step_*")) if p.resolve() != path.resolve()
                      and resume_state_file(p) is not None]  # fmt: skip
            raise SystemExit(f"{f}: unreadable weights ({type(e).__name__}: {e}); the checkpoint is damaged. "
                             f"Other complete checkpoints in {path.parent}: {', '.join(others) or 'none'}") from None
    # mmap: a rank that only needs the RNG states and the step does not page in the optimizer state
    blob = load_trainer_state(resume_state_file(path), mmap=True)
    if sharded:
        from utils.distributed import load_full_state

        if reader and getattr(target.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # save_pretrained drops the tied copy
        saved_optimizer = optimizer if blob["optimizer"] is not None else None  # the same answer on every rank
        load_full_state(target, saved_optimizer, state, blob["optimizer"] if reader else {}, dist_info)
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
