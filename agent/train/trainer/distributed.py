"""Processes: one, DDP replicas (gloo on CPU, NCCL on GPUs) or FSDP shards, as torchrun starts them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from moshi.modules.lora import LoRALinear


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_pref: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_pref not in ("cpu",)
    if world == 1:
        device = torch.device(device_pref or ("cuda" if use_cuda else "cpu"))
        return Dist(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device



def fsdp_shard(module: torch.nn.Module, device: torch.device, world: int, dtype: torch.dtype) -> None:
    """Shard parameters, gradients and optimizer state over the processes (FSDP2, in place): the 7B's
    frozen bf16 weights fit once per GPU, not once per process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    # One all-gather dtype per group: fp32 trainable and bf16 frozen weights are gathered in `dtype`.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # fully_shard swaps the class of the module it wraps, which moshi's streaming modules do not allow;
    # their LoRA-wrapped Linears (nearly all the weights) are plain modules, so they are the units; in a
    # full fine-tune (no LoRA) the plain Linears are.
    units = [m for m in module.modules() if isinstance(m, LoRALinear)] or \
        [m for m in module.modules() if type(m) is torch.nn.Linear]
    for linear in units:
        fully_shard(linear, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)

