"""Engines: who runs forward, backward and the optimizer step (`train.engine`).

The trainer calls, per step: `forward`, `backward`, then the strategy's `synchronize()`, then `step`.
An engine must never synchronise gradients itself: that is the strategy's job.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Engine(Protocol):
    module: nn.Module  # the model whose parameters are trained (unwrapped)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def close(self) -> None: ...


class TorchEngine:
    def __init__(self, module: nn.Module, fwd: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.module, self.fwd, self.optimizer, self.scheduler = module, fwd, optimizer, scheduler

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fwd(tokens, mask)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


def build_engine(cfg, module: nn.Module, fwd: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, world_size: int) -> Engine:
    if cfg.train.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, module, fwd, optimizer, scheduler, world_size)
    return TorchEngine(module, fwd, optimizer, scheduler)
