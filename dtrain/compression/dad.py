"""`dad`: distributed auto-differentiation (Baker et al., arXiv:2102.09631). Exact.

Per captured nn.Linear each rank contributes its (A_i, Δ_i) rows instead of its out×in weight gradient:
every rank all-gathers them (rank order) and forms

    weight.grad = [Δ_1; …; Δ_S]ᵀ [A_1; …; A_S] / S = Σ_i Δ_iᵀ A_i / S,

the all-reduce mean when each rank's loss is the mean over an equal share of the global batch (DDP
semantics). Rows may differ by rank, so the row counts of all layers travel in one small all-gather per
step (`Comm.exchange_counts`), padded rows are sent and counted. Per layer A and Δ are packed side by side
into one (rows, in+out) tensor, so a layer costs one collective.

Everything else (biases of captured layers, LayerNorm, embeddings, parameters of uncaptured layers) is
all-reduced (mean, bucketed) so replicas never drift. A captured weight that also got an ordinary gradient
from another path has that part all-reduced and added; whether any rank has one travels in the same
counts exchange, so every rank calls the same collectives.

Bytes per step (payload sent by one rank, fp32): 8·2L (counts) + Σ_layers max_i N_i·(in+out)·4
+ 4·Σ_rest numel (+ 4·in·out for a captured weight with an extra dense gradient on any rank).

The captured pairs of several backward passes accumulate until `synchronize()`, so gradient accumulation
(no_sync) stays exact with the default no-op `no_sync`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .base import CommStats, Strategy
from .buckets import BucketedMean
from .capture import LinearCapture, attach_linears
from .comm import Comm


@dataclass
class LayerStep:
    """One captured weight's data for this step, after the counts exchange (identical metadata on all ranks)."""

    capture: LinearCapture
    a: torch.Tensor
    delta: torch.Tensor
    rows: list[int]  # rows per rank, rank order
    dense_anywhere: bool  # some rank accumulated an ordinary gradient into weight.grad


class DAD(Strategy):
    name = "dad"
    exact = True

    def __init__(self, cfg, group: Optional[dist.ProcessGroup] = None) -> None:
        self.cfg = cfg
        self.comm = Comm(group)
        self.captures: list[LinearCapture] = []
        self.rest: list[tuple[str, nn.Parameter]] = []
        self.rest_mean: Optional[BucketedMean] = None

    # ------------------------------------------------------------------ setup
    def attach(self, model: nn.Module) -> nn.Module:
        self.captures = attach_linears(model)
        managed = {id(c.weight) for c in self.captures}
        self.rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in managed]
        self.rest_mean = BucketedMean(self.rest, self.cfg.bucket_mb, prefix=f"{self.name}/rest")
        return model

    def close(self) -> None:
        for capture in self.captures:
            capture.remove()
        self.captures = []

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "layers": {c.name: {"in": c.in_features, "out": c.out_features} for c in self.captures},
            "rest_params": [n for n, _ in self.rest],
        }

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def synchronize(self) -> CommStats:
        if self.rest_mean is None:
            raise RuntimeError(f"{self.name}: synchronize() before attach()")
        for layer in self._plan(self._collect()):
            grad = self._weight_grad(layer)
            self._set_weight_grad(layer, grad)
        self.rest_mean(self.comm)
        return self.comm.reset()

    def _collect(self) -> list[LayerStep]:
        """Take every capture's pairs and exchange (rows, extra-dense flag) of all layers in one collective."""
        if not self.captures:
            return []
        dense = [int(c.dense_grad_arrived) for c in self.captures]
        taken = [c.take() for c in self.captures]
        table = self.comm.exchange_counts([a.shape[0] for a, _ in taken] + dense)
        n = len(self.captures)
        return [
            LayerStep(c, a, d, [t[i] for t in table], any(t[n + i] for t in table))
            for i, (c, (a, d)) in enumerate(zip(self.captures, taken))
        ]

    def _plan(self, layers: list[LayerStep]) -> list[LayerStep]:
        """Hook for `auto`: the layers this strategy synchronises through captured data."""
        return layers

    def _weight_grad(self, layer: LayerStep) -> Optional[torch.Tensor]:
        """Σ_i Δ_iᵀ A_i / S from the gathered pairs; None when no rank recorded a row."""
        if max(layer.rows) == 0:
            return None
        c = layer.capture
        packed = torch.cat([layer.a, layer.delta], dim=1)
        rows = torch.cat(self.comm.all_gather_rows(packed, layer.rows, c.name))
        a, delta = rows[:, :c.in_features], rows[:, c.in_features:]
        return (delta.T @ a).div_(self.comm.world_size)

    def _set_weight_grad(self, layer: LayerStep, grad: Optional[torch.Tensor]) -> None:
        weight = layer.capture.weight
        if layer.dense_anywhere:
            dense = weight.grad if weight.grad is not None else torch.zeros_like(weight)
            dense = self.comm.all_reduce_(dense.contiguous(), f"{layer.capture.name}/dense")
            dense.div_(self.comm.world_size)
            grad = dense if grad is None else grad.add_(dense)
        if grad is not None:
            weight.grad = grad
