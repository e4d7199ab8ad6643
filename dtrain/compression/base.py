"""The interface between the trainer and a gradient-communication strategy.

The trainer knows only this:

    strategy = build_strategy(cfg.comm, world)      # dtrain.compression.build_strategy
    fwd = strategy.attach(model)                    # module to run forward through (DDP wraps)
    loss = loss_fn(fwd(x)); loss.backward()
    stats = strategy.synchronize()                  # every rank now holds the same mean gradient
    optimizer.step()

A strategy is composed GRACE-style of parts that can be tested alone: codecs (what is sent: dense, low-rank
factors, (A, Δ) rows; `codecs/`), their memory (error-feedback residuals, warm-start factors; `memory`) and the
communicator (`Comm`: which collective, and the byte accounting). No strategy class inherits from another.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class CommStats:
    """What one rank handed to and received from collectives for one step's gradient sync.

    bytes_sent: payload bytes, elements x element size of every tensor passed to a collective.
    bytes_recv: payload bytes delivered back by those collectives from other ranks.
    wire_bytes: estimated bytes this rank puts on the wire under the collective's algorithm
        (ring all-reduce: 2(S-1)/S x payload; all_gather: (S-1) x own payload received, own payload
        sent to each peer in a ring: (S-1) x payload).
    time_s: wall time spent inside collectives (and waiting on them).
    per_layer: bytes_sent keyed by layer / parameter group name.
    extra: strategy-specific numbers for logging (e.g. rankdad singular values).
    """

    bytes_sent: int = 0
    bytes_recv: int = 0
    wire_bytes: float = 0.0
    time_s: float = 0.0
    per_layer: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


class Strategy(abc.ABC):
    """A data-parallel gradient synchronisation strategy."""

    #: the `comm.strategy` name (whether it is exact: `registry.STRATEGIES[name].exact`)
    name: str = ""

    @abc.abstractmethod
    def attach(self, model: nn.Module) -> nn.Module:
        """Prepare `model` (hooks, capture layers, wrappers). Returns the module to call forward on.

        Parameter names and shapes of `model` must not change: checkpoints and model.pt use them.
        """

    @abc.abstractmethod
    def synchronize(self) -> CommStats:
        """Called after backward and before optimizer.step(): leaves p.grad equal on every rank."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Context for a backward whose gradient must not be synchronised (grad accumulation)."""
        yield

    def rescale_memory(self, ratio: float) -> None:
        """The gradients this strategy synchronises changed units by `ratio` (fp16 loss scaling: new / old
        scale): error-feedback residuals follow, so they are never added to gradients of another scale."""

    def state_dict(self) -> dict[str, Any]:
        """Strategy memory to checkpoint (error-feedback residuals, warm-start factors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected strategy state keys {sorted(state)}")

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (the per-layer plan for `auto`), written to the run directory's plan.json
        after the first step. An optional "warnings" list of one-line strings is printed to the user."""
        return {"strategy": self.name}

    def close(self) -> None:
        """Remove hooks and wrappers."""


def fp32_allreduce_bytes(model: nn.Module) -> int:
    """Payload of a plain fp32 all-reduce of every trainable parameter's gradient."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
