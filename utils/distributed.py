"""Data-parallel training with PyTorch FSDP2 (`fully_shard`), launched by `torchrun`; a no-op in one process.

Each rank holds a shard of parameters, gradients and AdamW state; an 8B model's fp32 AdamW state (~96 GB with master
weights and gradients) does not fit one 80 GB GPU, so the instruction trainer shards it. On CPU the gloo backend runs
the same code path, which is how the tests check it.

Only rank 0 reads a checkpoint (`build_sharded_from_rank0`, `load_full_state`): the others build the model on the
meta device and receive their shards. Resume state is written as per-rank shards (`save_sharded_state`), never
gathered, and reloads on any number of ranks; the served weights are consolidated on rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.

    `device` is the requested device ("cuda" / "cpu"); on CUDA each rank takes `cuda:<LOCAL_RANK>`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def shard_model(model: torch.nn.Module, info: DistInfo, precision: str) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, lm head).

    With `mixed` precision FSDP keeps fp32 sharded parameters and casts the gathered copies to bf16 for compute,
    reducing gradients in fp32. Gradients are averaged over ranks (FSDP's default).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.split(":")[0], (info.world_size,))
    mp = MixedPrecisionPolicy()
    if precision == "mixed":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = model.get_decoder().layers
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few floats over ranks (identity in one process)."""
    if not info.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def full_model_state_dict(model: torch.nn.Module, info: DistInfo) -> dict | None:
    """The consolidated (unsharded, CPU) state dict on rank 0; None on other ranks; the plain one without FSDP."""
    if not info.enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else None


def full_optimizer_state_dict(model, optimizer, info: DistInfo) -> dict | None:
    """The consolidated optimizer state on rank 0 (keyed by parameter name), None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else None


def load_full_state(model, optimizer, model_sd: dict, optim_sd: dict | None, info: DistInfo) -> None:
    """Load consolidated model (and optimizer) state into a sharded model: rank 0 passes the full state dicts and
    broadcasts them tensor by tensor; the other ranks pass empty ones and keep only their shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_sd if info.is_main else {}, options=opts)
    if optimizer is not None:  # every rank or none: the broadcast is a collective
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd if info.is_main else {}, options=opts)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def read_full_state_dict(model_path, tied: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's (or hub id's) safetensors files, on the CPU in the files' dtype (bf16 for a
    bf16 hub model: half the bytes to broadcast); with `tied`, `lm_head.weight` is added as the embedding
    (save_pretrained drops it)."""

    from safetensors.torch import load_file

    if not Path(model_path).is_dir():  # a hub id: the HF cache's snapshot (downloaded once, by this rank only)
        from huggingface_hub import snapshot_download

        model_path = snapshot_download(str(model_path), allow_patterns=["*.safetensors", "*.json"])
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_path}: no *.safetensors weights (rank-0 loading reads safetensors only)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _rebuild_rotary_buffers(model: torch.nn.Module, device: str) -> None:
    """Recompute the non-persistent buffers `to_empty` left uninitialized: HF's rotary embeddings (`inv_freq`,
    `original_inv_freq`) are derived from the config and are in no checkpoint. Any other module with such buffers is
    refused, since its values could not be restored."""
    for name, module in model.named_modules():
        if not module._non_persistent_buffers_set:
            continue
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "config"):
            raise RuntimeError(f"{name} ({type(module).__name__}) has non-persistent buffers "
                               f"{sorted(module._non_persistent_buffers_set)} that rank-0 loading cannot restore")
        with torch.device(device):
            fresh = type(module)(config=module.config)
        for buf in module._non_persistent_buffers_set:
            setattr(module, buf, getattr(fresh, buf))


def build_sharded_from_rank0(model_path, dtype: torch.dtype, info: DistInfo, precision: str, prepare=None):
    """The policy sharded with FSDP2, with only rank 0 reading the weights: every rank builds the model on the meta
    device (no memory, no init), shards it, allocates its own shards on `info.device`, and receives them from rank 0
    (`set_model_state_dict(..., broadcast_from_rank0=True)`, one tensor at a time, cast into the shards' dtype).

    Eight ranks each reading an 8B checkpoint would hold 8 full copies in host memory at once; here one does.

    Args:
        model_path: a local HF folder with safetensors weights (rank 0 reads them).
        dtype: the training weights' dtype (fp32 master weights or bf16), whatever the files hold.
        info: from `init_distributed` (enabled).
        precision: resolved precision for `shard_model`.
        prepare: called with the meta model before sharding (attention backend, gradient checkpointing, compile).

    Returns:
        the sharded model, parameters are DTensors on `info.device`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = str(model_path)  # vLLM and the tokenizer look the folder up here (as from_pretrained)
    if prepare is not None:
        prepare(model)
    shard_model(model, info, precision)
    model.to_empty(device=info.device)
    _rebuild_rotary_buffers(model, info.device)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    full = read_full_state_dict(model_path, tied) if info.is_main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if tied:  # to_empty gave the head its own storage; tie it back to the (loaded) embedding, as from_pretrained does
        model.tie_weights()
    return model


def save_sharded_state(model, optimizer, folder) -> None:
    """Every rank writes its own shards of the model and AdamW state into `folder` (torch.distributed.checkpoint):
    no rank gathers the full fp32 optimizer state, and the files reload on any number of ranks, one included."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


# What the `.metadata` file of a torch.distributed.checkpoint folder may name: DCP unpickles it with plain pickle
# (torch 2.13), which would run any code a tampered file names, so it is read with this allowlist first.
_DCP_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip


def check_dcp_metadata(folder) -> None:
    """Refuse a sharded checkpoint whose `.metadata` names anything beyond DCP's own metadata classes, torch dtypes and
    paths (SystemExit naming the file); nothing in it is constructed before the check passes."""
    import pickle

    import torch

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = (module == "torch.distributed.checkpoint.metadata" or (module, name) in _DCP_METADATA_GLOBALS
                       or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))  # fmt: skip
            if not allowed:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
            return super().find_class(module, name)

    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            Restricted(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise SystemExit(f"{path}: refused to load ({e}): sharded checkpoints written by this repo hold only DCP "
                         f"metadata; this file could run code when unpickled") from None


def load_sharded_state(model, optimizer, folder) -> None:
    """Load `save_sharded_state`'s files into `model` and `optimizer`, resharded to this run's ranks (or into a plain
    model in one process). The metadata is checked first (`check_dcp_metadata`)."""
    import torch.distributed.checkpoint as dcp

    check_dcp_metadata(folder)
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # the target layout; the optimizer state is initialized
    state = {"model": model_sd, "optim": optim_sd}
    import torch.distributed as dist

    dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())  # one process: say so, no warning
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
