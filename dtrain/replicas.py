"""Replica consistency: every rank must hold bitwise the same parameters.

Each parameter is reduced to an exact integer checksum of its bits; MAX and MIN all-reduces of the checksum
vector reveal any parameter that differs on some rank, by name.
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import all_reduce_max, all_reduce_min, group_world_size


class ReplicaMismatch(RuntimeError):
    pass


def param_checksums(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    names, sums = [], []
    for name, p in model.named_parameters():
        bits = p.detach().contiguous().view(-1).view(torch.uint8).to(torch.int64)
        # position-weighted so that swapped elements also change the sum; int64 arithmetic is exact (wraps)
        weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
        names.append(name)
        sums.append((bits * weights).sum())
    return names, torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def check_replicas(model: nn.Module) -> None:
    """Raise ReplicaMismatch naming the parameters that differ between ranks."""
    if group_world_size() == 1:
        return
    names, sums = param_checksums(model)
    hi, lo = all_reduce_max(sums.clone()), all_reduce_min(sums.clone())
    differ = [name for name, high, low in zip(names, hi.tolist(), lo.tolist()) if high != low]
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise ReplicaMismatch(f"replicas diverged: {len(differ)} parameter(s) differ between ranks: {shown}")
