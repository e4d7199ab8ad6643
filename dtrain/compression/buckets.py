"""Exact mean of a fixed set of gradients through flat fp32 buffers: one all-reduce per bucket.

Packing many small gradients into one buffer pays the per-collective latency once per bucket instead of once
per parameter (the reason DDP buckets). Bytes are charged to each parameter's name (`Comm` `parts`), so
`CommStats.per_layer` says which layers cost what even though they travel together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .comm import Comm

#: bytes per element on the wire: buckets are always fp32, whatever the gradient dtype
_FP32_BYTES = 4


@dataclass(frozen=True)
class Bucket:
    names: tuple[str, ...]
    numels: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(self.numels) * _FP32_BYTES


def plan_buckets(sizes: Sequence[tuple[str, int]], cap_bytes: int) -> list[Bucket]:
    """Greedy, in the given order: a bucket closes when the next tensor would overflow `cap_bytes`; a tensor
    larger than the cap travels alone."""
    buckets: list[Bucket] = []
    names: list[str] = []
    numels: list[int] = []
    for name, numel in sizes:
        if names and (sum(numels) + numel) * _FP32_BYTES > cap_bytes:
            buckets.append(Bucket(tuple(names), tuple(numels)))
            names, numels = [], []
        names.append(name)
        numels.append(numel)
    if names:
        buckets.append(Bucket(tuple(names), tuple(numels)))
    return buckets


def mib_to_bytes(mb: float) -> int:
    """`comm.bucket_mb` is in MiB, like DDP's `bucket_cap_mb`."""
    return int(mb * 2**20)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What a strategy synchronises, in registration order (the same on every rank)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grad_or_zeros(p: nn.Parameter) -> torch.Tensor:
    """The gradient to synchronise. A parameter without one (unused in this rank's forward) contributes zeros,
    so every rank packs the same layout and calls the same collectives: no hang, no rank-dependent skip. After
    the mean it holds a gradient on every rank (zeros if no rank used it)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


class BucketedMean:
    """Replaces the gradients of `params` by their mean over ranks, exactly (fp32 sum, then / world size)."""

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]], bucket_mb: float, prefix: str) -> None:
        self.prefix = prefix
        self.buckets = plan_buckets([(n, p.numel()) for n, p in params], mib_to_bytes(bucket_mb))
        by_name = dict(params)
        self._members = [[by_name[n] for n in b.names] for b in self.buckets]

    @property
    def nbytes(self) -> int:
        """Payload per call, closed form: sum of numel x 4."""
        return sum(b.nbytes for b in self.buckets)

    def layout(self) -> list[list[str]]:
        return [list(b.names) for b in self.buckets]

    def __call__(self, comm: Comm) -> None:
        for i, (bucket, members) in enumerate(zip(self.buckets, self._members)):
            grads = [grad_or_zeros(p) for p in members]
            flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
            parts = {n: k * _FP32_BYTES for n, k in zip(bucket.names, bucket.numels)}
            comm.all_reduce_(flat, f"{self.prefix}/bucket{i}", parts=parts)
            flat.div_(comm.world_size)
            for g, chunk in zip(grads, flat.split(list(bucket.numels))):
                g.copy_(chunk.view_as(g))
