"""Gradient-communication strategies (`comm.strategy`). The trainer uses only `build_strategy`.

How the package is composed (docs/architecture.md has the picture):

- `registry`: the strategy names, their typed options and where each is built (torch-free);
- `base`: the `Strategy` interface the trainer sees, and `CommStats`;
- `comm`: `Comm`, the only way to reach a collective, with the byte accounting;
- `capture`: the gradient source of the dAD family ((A, Δ) of managed Linear layers; the rest dense);
- `codecs/`: per-layer codecs (what a layer sends and how the received tensors become its gradient) and the
  codecs of the dense rest;
- `memory`: the one error-feedback memory and the warm-start memory;
- `scheduler`: when each captured layer's collective starts (overlap with backward);
- `captured`: the dAD-family strategy, a plan (layer -> codec) plus the scheduler; `plan`: the plans;
- `allreduce`, `powersgd`, `ddp`: the baselines.

Only `registry` is imported eagerly, so `dtrain.config` stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import EXACT_STRATEGIES, STRATEGIES, STRATEGY_NAMES

if TYPE_CHECKING:
    import torch.distributed as dist

    from .base import Strategy


def build_strategy(cfg: Any, group: dist.ProcessGroup | None = None) -> Strategy:
    """`cfg`: the `comm` section (`dtrain.config.CommConfig`); the strategy gets its own typed options."""
    spec = STRATEGIES.get(cfg.strategy)
    if spec is None:
        raise ValueError(f"comm.strategy: {cfg.strategy!r} is not one of {', '.join(STRATEGY_NAMES)}")
    module, factory = spec.target.split(":")
    return getattr(importlib.import_module(module), factory)(cfg.options(), group)


def __getattr__(name: str) -> Any:
    # the torch-side names on first use (PEP 562)
    if name in ("CommStats", "Strategy", "fp32_allreduce_bytes"):
        return getattr(importlib.import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CommStats",
    "EXACT_STRATEGIES",
    "STRATEGIES",
    "STRATEGY_NAMES",
    "Strategy",
    "build_strategy",
    "fp32_allreduce_bytes",
]
