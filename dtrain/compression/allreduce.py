"""`allreduce`: the exact baseline. Every gradient, fp32, bucketed, summed over ranks and divided by their number."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from .base import CommStats, Strategy
from .buckets import BucketedMean, trainable_parameters
from .comm import Comm


class AllReduce(Strategy):
    name = "allreduce"

    def __init__(self, options: Any, group: dist.ProcessGroup | None = None) -> None:
        self.bucket_mb = options.bucket_mb
        self.comm = Comm(group)
        self.mean: BucketedMean | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        self.mean = BucketedMean(trainable_parameters(model), self.bucket_mb, prefix=self.name)
        return model

    def synchronize(self) -> CommStats:
        if self.mean is None:
            raise RuntimeError("allreduce: synchronize() before attach()")
        self.mean(self.comm)
        return self.comm.reset()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"strategy": self.name}
        if self.mean is not None:
            info.update(bytes_per_step=self.mean.nbytes, buckets=self.mean.layout())
        return info
