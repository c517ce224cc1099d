"""torch.distributed set-up for `torchrun`: one process per device, DDP, rank 0 does the talking.

A plain `python` run is a world of one and never touches torch.distributed. Under torchrun (RANK and
WORLD_SIZE in the environment) the process group uses NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from masa.runtime import resolve_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the one process that logs, evaluates to screen and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group is running (more than one process)."""
        return self.world_size > 1


def _pick_device(preference: str, local_rank: int) -> torch.device:
    device = resolve_device(preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # torchrun: one GPU per local process
    return device


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if there is one; choose this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    chosen = _pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world_size, device=chosen)


def shutdown(env: DistEnv) -> None:
    """Leave the process group (no-op for a single process)."""
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op for a single process)."""
    if env.active:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over all ranks (returned in place; unchanged for a single process)."""
    if env.active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
