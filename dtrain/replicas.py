"""Replica consistency: every rank must hold bitwise the same parameters.

Each parameter is reduced to an exact integer checksum of its bits; MAX and MIN all-reduces of the checksum
vector reveal any parameter that differs on some rank, by name.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ReplicaMismatch(RuntimeError):
    pass


def param_checksums(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    names, sums = [], []
    for name, p in model.named_parameters():
        bits = p.detach().contiguous().view(-1).view(torch.uint8).to(torch.int64)
        # position-weighted so that swapped elements also change the sum; int64 arithmetic is exact (wraps)
        weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64)
        names.append(name)
        sums.append((bits * weights).sum())
    return names, torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def check_replicas(model: nn.Module) -> None:
    """Raise ReplicaMismatch naming the parameters that differ between ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    names, sums = param_checksums(model)
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    differ = [n for n, h, l in zip(names, hi.tolist(), lo.tolist()) if h != l]
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise ReplicaMismatch(f"replicas diverged: {len(differ)} parameter(s) differ between ranks: {shown}")
