"""`auto`: per Linear layer, the cheapest of allreduce, dad and rankdad under a byte cost model.

Cost model: estimated wire bytes one rank puts on its link per step for the layer's weight gradient
(the `CommStats.wire_bytes` convention: ring all-reduce 2(S−1)/S × payload, all-gather (S−1) × payload):

    allreduce  2(S−1)/S · in·out · 4
    dad        (S−1) · N · (in+out) · 4              N = rows per rank (max over ranks: padding is sent)
    rankdad    (S−1) · k · (in+out) · bytes(factor)  k = min(comm.rank, in, out, N)

The exact choice is the cheaper of allreduce and dad (ties go to allreduce, which needs no capture). rankdad
is lossy, so it is chosen only when it beats that exact choice by comm.min_compression_rate. Biases and all
other parameters are all-reduced whatever the plan.

Rows are known only after a forward pass, so the plan is made at the first `synchronize()` from that step's
row counts, which arrive with the counts exchange (max over ranks: identical on every rank), and is then
fixed for the run (a later change of N, e.g. another sequence length, does not re-plan). Layers planned as
allreduce are released from capture: that first step their gradient is formed locally from the captured
pair and all-reduced with the rest; afterwards autograd computes it as usual.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Optional

import torch
import torch.distributed as dist

from .dad import DAD, LayerStep, Launched
from .lowrank import clip_rank
from .rankdad import FACTOR_DTYPES, RankDAD

log = logging.getLogger(__name__)

METHODS = ("allreduce", "dad", "rankdad")


def layer_costs(in_features: int, out_features: int, rows: int, world_size: int, rank: int,
                factor_bytes: int) -> dict[str, float]:
    """Estimated wire bytes per rank per step of each method for one layer's weight gradient."""
    S = world_size
    k = clip_rank(rank, in_features, out_features, rows)
    return {
        "allreduce": 2.0 * (S - 1) / S * in_features * out_features * 4,
        "dad": float((S - 1) * rows * (in_features + out_features) * 4),
        "rankdad": float((S - 1) * k * (in_features + out_features) * factor_bytes),
    }


def choose_method(costs: dict[str, float], min_compression_rate: float) -> str:
    exact = "dad" if costs["dad"] < costs["allreduce"] else "allreduce"
    if costs["rankdad"] * min_compression_rate < costs[exact]:
        return "rankdad"
    return exact


class AutoStrategy(RankDAD):
    name = "auto"
    exact = False

    def __init__(self, cfg, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__(cfg, group)
        self.plan: Optional[dict[str, dict[str, Any]]] = None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "strategy": self.name,
            "cost_model": "wire bytes per rank per step: allreduce 2(S-1)/S*in*out*4, dad (S-1)*N*(in+out)*4, "
                          "rankdad (S-1)*k*(in+out)*bytes(factor); rankdad only if min_compression_rate times "
                          "cheaper than the exact choice",
            "world_size": self.comm.world_size,
            "rank": self.cfg.rank,
            "min_compression_rate": self.cfg.min_compression_rate,
        }
        info["plan"] = self.plan if self.plan is not None else "made at the first synchronize() (needs rows)"
        return info

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "plan": self.plan}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run keeps its plan (applied at the next synchronize()) even if N differs now."""
        state = dict(state)
        self.plan = state.pop("plan")
        super().load_state_dict(state)

    def _plan(self, layers: list[LayerStep]) -> list[LayerStep]:
        if self.plan is None:
            self.plan = self._make_plan(layers)
            if self.comm.rank == 0:
                log.info("auto plan: %s", json.dumps(self.plan))
        # after the first step (or a resume) allreduce layers are no longer captured: this finds none then
        self._release([layer for layer in layers if self.plan[layer.capture.name]["method"] == "allreduce"])
        return [layer for layer in layers if self.plan[layer.capture.name]["method"] != "allreduce"]

    def _make_plan(self, layers: list[LayerStep]) -> dict[str, dict[str, Any]]:
        factor_bytes = torch.empty((), dtype=FACTOR_DTYPES[self.cfg.factor_dtype]).element_size()
        plan = {}
        for layer in layers:
            c = layer.capture
            rows = max(layer.rows)
            costs = layer_costs(c.in_features, c.out_features, rows, self.comm.world_size, self.cfg.rank,
                                factor_bytes)
            plan[c.name] = {
                "method": choose_method(costs, self.cfg.min_compression_rate),
                "in": c.in_features, "out": c.out_features, "rows": rows,
                "k": clip_rank(self.cfg.rank, c.in_features, c.out_features, rows),
                "wire_bytes": costs,
            }
        return plan

    def _release(self, layers: list[LayerStep]) -> None:
        """Hand allreduce layers back to autograd; this step's gradient is formed from the captured pair."""
        if not layers:
            return
        for layer in layers:
            c = layer.capture
            local = layer.delta.T @ layer.a
            c.weight.grad = local if c.weight.grad is None else c.weight.grad + local
            c.remove()
            self.rest.append((f"{c.name}.weight", c.weight))
        released = {id(layer.capture) for layer in layers}
        self.captures = [c for c in self.captures if id(c) not in released]
        self.rest_mean = self._rest_sync(self._rest_state())

    def _overlap_ready(self) -> bool:
        """Overlap once the plan is made and its allreduce layers are released (after the first step)."""
        return self.plan is not None and all(self.plan[c.name]["method"] != "allreduce" for c in self.captures)

    def _launch(self, layer: LayerStep) -> Launched:
        if self.plan[layer.capture.name]["method"] == "dad":
            return DAD._launch(self, layer)
        return super()._launch(layer)

    def _finish(self, launched: Launched) -> Optional[torch.Tensor]:
        if self.plan[launched.layer.capture.name]["method"] == "dad":
            return DAD._finish(self, launched)
        return super()._finish(launched)
