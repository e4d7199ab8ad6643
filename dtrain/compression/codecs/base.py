"""The per-layer codec contract of the dAD family.

A codec turns one captured Linear layer's step data (`LayerStep`: its (A, Δ) rows on this rank and every
rank's row count) into the layer's mean weight gradient over ranks, in two halves so that a scheduler can
start the collective early and collect it late:

    pending = codec.launch(layer, comm)     # local encoding, then the collective started (async)
    grad = codec.finish(pending, comm)      # wait, decode: Σ_ranks (what each rank's Δᵀ A stands for) / S

Invariants every codec keeps:
- every rank calls the same collectives in the same order for the same layer metadata (`rows` is identical on
  every rank, the local row count is not), so ranks never hang;
- the decoded gradient is bitwise the same on every rank (it is computed from the same gathered data);
- `finish` returns None when no rank has anything for the layer (no rows anywhere).
A lossy codec keeps its error feedback in `memory.ErrorFeedback` and must leave it untouched by a step whose
decoded gradient is not finite.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..capture import LinearCapture
from ..comm import AsyncGather, Comm


@dataclass
class LayerStep:
    """One captured weight's data for this step, after the row-count exchange (identical metadata on all ranks)."""

    capture: LinearCapture
    a: torch.Tensor
    delta: torch.Tensor
    rows: list[int]  # rows per rank, rank order
    dense_anywhere: bool  # some rank accumulated an ordinary gradient into weight.grad


@dataclass
class Pending:
    """One layer's collective in flight: what `finish` needs to turn it into the weight gradient."""

    layer: LayerStep
    gather: AsyncGather | None  # None: nothing to send (no rows anywhere, or k = 0)
    data: dict[str, Any] = field(default_factory=dict)
    in_backward: bool = False  # launched while backward was still running (the overlap scheduler sets it)


class LayerCodec(abc.ABC):
    """Encodes and decodes captured Linear layers. One instance serves every layer it is planned for; per-layer
    state (warm starts, residuals) is keyed by the layer's name."""

    #: the method name in plans and plan.json
    name: str = ""

    def bind(self, layer_names: list[str]) -> None:
        """Called once at attach with every captured layer's name, in registration order (the same on every rank)."""

    @abc.abstractmethod
    def launch(self, layer: LayerStep, comm: Comm) -> Pending:
        """Encode this rank's data and start the collective."""

    @abc.abstractmethod
    def finish(self, pending: Pending, comm: Comm) -> torch.Tensor | None:
        """Wait for the collective and return the layer's mean weight gradient (None: no rows on any rank)."""

    def launch_all(self, layers: Sequence[LayerStep], comm: Comm) -> list[Pending]:
        """`launch` for several of this codec's layers at once, after backward (the same layers in the same order
        on every rank): a codec may coalesce their collectives into one."""
        return [self.launch(layer, comm) for layer in layers]

    def finish_all(self, pendings: Sequence[Pending], comm: Comm) -> list[torch.Tensor | None]:
        """`finish` for several of this codec's layers, in launch order (the same layers in the same order on every
        rank): a codec whose decode needs another collective may coalesce those of all the layers into one."""
        return [self.finish(p, comm) for p in pendings]

    @abc.abstractmethod
    def wire_bytes(self, in_features: int, out_features: int, rows: int, world_size: int, row_bytes: int = 4) -> float:
        """Estimated bytes one rank puts on its link per step for a layer (rows: the most over ranks; row_bytes:
        the element size of the captured rows, 2 under 16-bit autocast): the cost model of `auto`, in the
        `CommStats.wire_bytes` convention."""

    def messages(self, world_size: int) -> int:
        """Ring steps one layer's collectives take one after the other per step: the latency term of `auto`'s time
        model. One ring all-gather has S−1."""
        return world_size - 1

    def end_step(self) -> None:
        """Called once after every synchronised step."""

    def rescale_memory(self, ratio: float) -> None:
        """Error-feedback residuals × ratio (see `Strategy.rescale_memory`)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes the keys this codec's `state_dict` writes (the caller passes only those: they sit beside other
        parts' keys in a checkpoint)."""

    def describe(self, captures: Sequence[LinearCapture]) -> dict[str, Any]:
        """For plan.json: the codec's settings, and an optional "warnings" list of one-line strings about
        `captures` (the layers it serves)."""
        return {}
