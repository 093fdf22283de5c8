"""Data-parallel training with PyTorch FSDP2 (`fully_shard`), launched by `torchrun`; a no-op in one process.

Each rank holds a shard of parameters, gradients and AdamW state; an 8B model's fp32 AdamW state (~96 GB with master
weights and gradients) does not fit one 80 GB GPU, so the instruction trainer shards it. On CPU the gloo backend runs
the same code path, which is how the tests check it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "mixed" else MixedPrecisionPolicy()
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


def load_full_state(model, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
    """Load consolidated model (and optimizer) state into a sharded model on every rank."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd, options=opts)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
