"""Process-group set-up for every way dtrain is launched.

- plain `dtrain train` (no launcher): a world-size-1 gloo group on an in-memory store, so every strategy
  (DDP included) runs the same code path at world size 1;
- torchrun / `python -m torch.distributed.run`: RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment;
- the deepspeed launcher: the same variables, plus `--local_rank=N` on the command line (see cli.py).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """World size announced by a launcher, before any process group exists (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float = 300.0, local_rank: int | None = None) -> DistEnv:
    timeout = datetime.timedelta(seconds=timeout_s)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("DTRAIN_DEVICE", "") != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # NCCL refuses two ranks on one GPU; gloo on CUDA tensors still works there (DTRAIN_BACKEND=gloo).
    backend = os.environ.get("DTRAIN_BACKEND") or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_agree(flag: bool) -> bool:
    """True when `flag` is True on every rank (a 1-int MAX all-reduce of `not flag`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) == 0
