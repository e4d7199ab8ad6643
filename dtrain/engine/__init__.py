"""Engines: who runs forward, backward and the optimizer step (`train.engine`).

The trainer calls, per step: `forward`, `backward`, then the strategy's `synchronize()`, then `step`.
An engine must never synchronise gradients itself: that is the strategy's job.

Checkpoints: with `state_format = None` the Checkpointer stores `module` and the torch optimizer itself (DCP).
An engine whose optimizer state is not a plain torch optimizer's (DeepSpeed ZeRO-1: partitioned across ranks)
names its format instead and writes and reads model + optimizer itself with `save_state(dir)` / `load_state(dir)`,
called on every rank, inside the checkpoint directory (so the manifest covers the files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..precision import Precision


class Engine(Protocol):
    module: nn.Module  # the model whose parameters are trained (unwrapped)
    state_format: str | None  # None: DCP; else save_state/load_state below (recorded in meta.json)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def close(self) -> None: ...

    # only when state_format is set:
    def save_state(self, directory: Path) -> None: ...

    def load_state(self, directory: Path) -> None: ...


class TorchEngine:
    state_format: str | None = None

    def __init__(
        self,
        module: nn.Module,
        fwd: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        precision: Precision,
    ) -> None:
        self.module, self.fwd, self.optimizer, self.scheduler = module, fwd, optimizer, scheduler
        self.precision = precision

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fwd(tokens, mask)

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.scale(loss).backward()

    def step(self) -> None:
        self.precision.step(self.optimizer)  # with fp16's scaler: skipped when the gradients overflowed
        self.scheduler.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


def build_engine(
    cfg,
    module: nn.Module,
    fwd: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    world_size: int,
    precision: Precision,
) -> Engine:
    if cfg.train.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, module, fwd, optimizer, scheduler, world_size)
    return TorchEngine(module, fwd, optimizer, scheduler, precision)
