"""Data parallelism over torch.distributed (gloo on CPU, NCCL on GPUs), started by torchrun.

Each process takes every world_size-th prompt of an iteration; the seeds, timesteps and noise of a
sample depend only on its global position, so N processes compute the same samples one process would.
Group statistics (advantage std, metrics) and gradients are summed across processes; process 0 writes
files. ("Process index" is torch.distributed's rank; the word rank is kept for LoRA.)
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_index() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return process_index() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether it did."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def local_rows(count: int) -> list[int]:
    """This process's share of `count` rows (prompts): index, index + world_size, ..."""
    return list(range(process_index(), count, world_size()))


def sum_(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (in place when distributed); returns it."""
    if is_distributed():
        dist.all_reduce(value)
    return value


def gather_cat(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from every process (in process order)."""
    if not is_distributed():
        return values
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, values.cpu())
    return torch.cat(parts)


def broadcast(value: Any) -> Any:
    """Process 0's value on every process (e.g. the run directory name)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()
