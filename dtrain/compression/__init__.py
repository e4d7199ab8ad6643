"""Gradient-communication strategies (`comm.strategy`). The trainer uses only `build_strategy`."""
from __future__ import annotations

import importlib
from typing import Optional

import torch.distributed as dist

from .base import CommStats, Strategy, fp32_allreduce_bytes

# name -> "module:Class", imported on demand so that one strategy's imports never slow the others
_REGISTRY = {
    "allreduce": "dtrain.compression.allreduce:AllReduce",
    "ddp": "dtrain.compression.ddp:DDPStrategy",
    "ddp-powersgd": "dtrain.compression.ddp:DDPPowerSGDStrategy",
    "powersgd": "dtrain.compression.powersgd:PowerSGD",
    "dad": "dtrain.compression.dad:DAD",
    "rankdad": "dtrain.compression.rankdad:RankDAD",
    "auto": "dtrain.compression.auto:AutoStrategy",
}


def build_strategy(cfg, group: Optional[dist.ProcessGroup] = None) -> Strategy:
    """`cfg` is a `dtrain.config.CommConfig`."""
    try:
        target = _REGISTRY[cfg.strategy]
    except KeyError:
        raise ValueError(f"comm.strategy: {cfg.strategy!r} is not one of {', '.join(_REGISTRY)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, group)


__all__ = ["CommStats", "Strategy", "build_strategy", "fp32_allreduce_bytes"]
