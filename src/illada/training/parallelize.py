"""Distribution, activation checkpointing and compilation, applied to the model from outside (torchtitan style).

None of these change parameter names, so checkpoints do not depend on how a run was parallelised.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from illada.errors import IlladaError
from illada.model import Transformer


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    env = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    return env


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass (trades compute for memory)."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: Transformer) -> None:
    """Compile each block separately: repeated blocks share one compiled graph and names stay unchanged."""
    for block in model.layers:
        block.compile()


def apply_fsdp(model: Transformer, env: DistEnv) -> nn.Module:
    """Shard parameters, gradients and optimizer state over all ranks with FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def apply_ddp(model: Transformer, env: DistEnv, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def parallelize(model: Transformer, mode: str, env: DistEnv, device: torch.device, *,
                activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Apply the requested wrappers; returns the module to call in the training loop."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if mode == "auto":
        mode = "ddp" if env.enabled else "none"
    if mode in ("ddp", "fsdp") and not env.enabled:
        if mode == "fsdp":
            raise IlladaError("distributed=fsdp needs several processes: start with `torchrun --nproc-per-node N -m illada train ...`")
        return model
    if mode == "none" and env.enabled:
        raise IlladaError("distributed=none under torchrun with several processes: use ddp or fsdp")
    if mode == "fsdp":
        return apply_fsdp(model, env)
    if mode == "ddp":
        return apply_ddp(model, env, device)
    return model
