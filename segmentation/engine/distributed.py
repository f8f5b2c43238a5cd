"""torchrun integration: process-group setup from the environment, rank helpers, teardown.

One code path serves a single process (no process group), ``torchrun --nproc_per_node=N`` and
multi-node torchrun. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("TRAIN.device is 'cuda' but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistContext:
    """Join the process group described by torchrun's variables, or run as one process."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device))
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"incomplete torchrun environment: {', '.join(missing)} not set")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    ctx_device = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if ctx_device.type == "cuda" else "gloo"
        if ctx_device.type == "cuda":
            torch.cuda.set_device(ctx_device)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": ctx_device} if ctx_device.type == "cuda" else {}),
        )
    return DistContext(rank, world, local_rank, ctx_device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        # gloo's worker threads free finished work (tensors with Python objects: they take the
        # GIL); the process group's destructor joins those threads while holding the GIL, which
        # hung 1 of 3 two-rank CPU runs at exit. A GIL-free pause lets them finish first.
        time.sleep(0.2)
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
