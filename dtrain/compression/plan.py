"""Plans of the dAD family: which codec each captured Linear layer uses.

- `FixedPlan`: one codec for every layer (`dad`: rows, `rankdad`: factors).
- `CostModelPlan` (`auto`): per layer the cheapest of all-reduce, the rows codec and the two factor codecs under
  a byte cost model at this world size S, the codecs' own `wire_bytes` (the `CommStats.wire_bytes` convention):

      allreduce          2(S−1)/S · in·out · 4
      dad                (S−1) · N · (in+out) · 4 (2 under 16-bit autocast)   N = rows per rank (max over ranks)
      rankdad            (S−1) · k · (in+out) · bytes(factor)       k = min(comm.rank, in, out, N): all-gather
      rankdad-allreduce  2(S−1)/S · iters · k · (in+out) · bytes(factor)     k = min(comm.rank, in, out, S·N)

  The exact choice is the cheaper of allreduce and dad (ties go to allreduce, which needs no capture); the lossy
  choice is the cheaper of the two factor forms (ties go to the all-gather, one round trip instead of two: so at
  S = 2, where their bytes are equal, rankdad; beyond, rankdad-allreduce). The lossy choice is taken only when it
  beats the exact one by comm.min_compression_rate. Rows are known only
  after a forward pass, so the plan is made at the first synchronize from that step's row counts (identical on
  every rank) and then fixed for the run. Layers planned as allreduce are released from capture: that first step
  their gradient is formed locally from the captured pair and all-reduced with the rest; afterwards autograd
  computes it as usual.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..config import link_bytes_per_s
from .capture import LinearCapture
from .codecs.base import LayerCodec, LayerStep
from .ranks import LayerCost, allocate

log = logging.getLogger(__name__)

ALLREDUCE = "allreduce"


def allreduce_wire_bytes(in_features: int, out_features: int, world_size: int) -> float:
    S = world_size
    return 2.0 * (S - 1) / S * in_features * out_features * 4


def layer_costs(
    codecs: Sequence[LayerCodec], in_features: int, out_features: int, rows: int, world_size: int, row_bytes: int = 4
) -> dict[str, float]:
    """Estimated wire bytes per rank per step of all-reduce and of each codec for one layer's weight gradient
    (row_bytes: element size of the captured rows)."""
    costs = {ALLREDUCE: allreduce_wire_bytes(in_features, out_features, world_size)}
    costs.update({c.name: c.wire_bytes(in_features, out_features, rows, world_size, row_bytes) for c in codecs})
    return costs


#: the lossy methods `auto` weighs, in order of preference on a tie
LOSSY = ("rankdad", "rankdad-allreduce")


def layer_seconds(
    codecs: Sequence[LayerCodec], costs: dict[str, float], world_size: int, link_rate: float, latency_s: float
) -> dict[str, float]:
    """`auto`'s time model on a link of `link_rate` bytes/s: messages × latency + wire bytes / rate per method
    (messages: the ring steps its collectives take one after the other; all-reduce's ring has 2(S−1))."""
    messages = {ALLREDUCE: 2 * (world_size - 1)}
    messages.update({c.name: c.messages(world_size) for c in codecs})
    return {m: messages[m] * latency_s + costs[m] / link_rate for m in costs}


def choose_method(costs: dict[str, float], min_compression_rate: float) -> str:
    exact = "dad" if costs["dad"] < costs[ALLREDUCE] else ALLREDUCE
    lossy = min((m for m in LOSSY if m in costs), key=lambda m: costs[m])  # min keeps the first of equals
    if costs[lossy] * min_compression_rate < costs[exact]:
        return lossy
    return exact


def one_codec_description(
    strategy: str, captures: Sequence[LinearCapture], rest: Sequence[str], codec: LayerCodec
) -> dict[str, Any]:
    """plan.json of a plan that sends every captured layer through `codec`."""
    return {
        "strategy": strategy,
        "layers": {c.name: {"in": c.in_features, "out": c.out_features} for c in captures},
        "rest_params": list(rest),
        **codec.describe(captures),
    }


class FixedPlan:
    """Every captured layer through one codec."""

    def __init__(self, codec: LayerCodec) -> None:
        self._codec = codec

    @property
    def ready(self) -> bool:
        return True

    def codecs(self) -> list[LayerCodec]:
        return [self._codec]

    def codec(self, layer: str) -> LayerCodec:
        return self._codec

    def apply(self, layers: list[LayerStep]) -> list[LayerStep]:
        return layers

    def end_step(self, layers: list[LayerStep]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(
        self, strategy: str, captures: Sequence[LinearCapture], rest: Sequence[str], world_size: int
    ) -> dict[str, Any]:
        return one_codec_description(strategy, captures, rest, self._codec)


class CostModelPlan:
    """`auto`. `release(layers)` hands the layers planned as allreduce back to autograd (the strategy's)."""

    def __init__(
        self,
        rows: LayerCodec,
        factors: Sequence[LayerCodec],
        options: Any,
        world_size: int,
        is_main: bool,
        captures: Callable[[], Sequence[LinearCapture]],
        release: Callable[[list[LayerStep]], None],
    ) -> None:
        self._by_method = {c.name: c for c in (rows, *factors)}
        self.options = options
        self.world_size = world_size
        self.is_main = is_main
        self._captures = captures
        self._release = release
        self.plan: dict[str, dict[str, Any]] | None = None

    @property
    def ready(self) -> bool:
        """Overlap once the plan is made and its allreduce layers are released (after the first step)."""
        return self.plan is not None and all(self.plan[c.name]["method"] != ALLREDUCE for c in self._captures())

    def codecs(self) -> list[LayerCodec]:
        return list(self._by_method.values())

    def codec(self, layer: str) -> LayerCodec:
        assert self.plan is not None
        return self._by_method[self.plan[layer]["method"]]

    def apply(self, layers: list[LayerStep]) -> list[LayerStep]:
        if self.plan is None:
            self.plan = self._make(layers)
            if self.is_main:
                log.info("auto plan: %s", json.dumps(self.plan))
        # after the first step (or a resume) allreduce layers are no longer captured: this finds none then
        self._release([layer for layer in layers if self.plan[layer.capture.name]["method"] == ALLREDUCE])
        return [layer for layer in layers if self.plan[layer.capture.name]["method"] != ALLREDUCE]

    def _make(self, layers: list[LayerStep]) -> dict[str, dict[str, Any]]:
        plan = {}
        for layer in layers:
            c = layer.capture
            rows = max(layer.rows)
            costs = layer_costs(
                self.codecs(), c.in_features, c.out_features, rows, self.world_size, layer.a.element_size()
            )
            seconds = None
            if self.options.link_rate is not None:
                rate, latency = link_bytes_per_s(self.options.link_rate), self.options.link_latency_us * 1e-6
                seconds = layer_seconds(self.codecs(), costs, self.world_size, rate, latency)
            method = choose_method(seconds or costs, self.options.min_compression_rate)
            plan[c.name] = {"method": method, "in": c.in_features, "out": c.out_features, "rows": rows}
            if method in LOSSY:  # the rank it will use (the all-reduce form bounds it by all ranks' rows)
                total = rows if method == "rankdad" else sum(layer.rows)
                plan[c.name]["k"] = self._by_method[method].rank_for(c.in_features, c.out_features, total)
            plan[c.name]["wire_bytes"] = costs
            if seconds is not None:
                plan[c.name]["seconds"] = seconds
        return plan

    def end_step(self, layers: list[LayerStep]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "plan_world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run keeps its plan (applied at the next synchronize) even if N differs now, unless it resumes
        at another world size (an elastic restart with fewer or more ranks): then the plan is made again at the next
        synchronize, since every cost depends on S."""
        same_world = state.get("plan_world_size", self.world_size) == self.world_size
        self.plan = state["plan"] if same_world else None

    def describe(
        self, strategy: str, captures: Sequence[LinearCapture], rest: Sequence[str], world_size: int
    ) -> dict[str, Any]:
        return {
            "strategy": strategy,
            "cost_model": "wire bytes per rank per step: allreduce 2(S-1)/S*in*out*4, dad (S-1)*N*(in+out)*4, "
            "rankdad (S-1)*k*(in+out)*bytes(factor), rankdad-allreduce 2(S-1)/S*iters*k*(in+out)*bytes(factor); "
            "the cheaper factor form only if min_compression_rate times cheaper than the exact choice",
            "time_model": (
                f"messages x {self.options.link_latency_us} us + wire bytes / {self.options.link_rate}"
                if self.options.link_rate
                else "off (comm.link_rate unset): bytes decide"
            ),
            "world_size": world_size,
            "rank": self.options.rank,
            "min_compression_rate": self.options.min_compression_rate,
            "plan": self.plan if self.plan is not None else "made at the first synchronize() (needs rows)",
        }


class BudgetPlan:
    """`rankdad` with `comm.budget_bytes` (or `comm.link_rate` + `comm.budget_ms`): one factor codec, with per-layer
    ranks that fit the budget (`ranks.allocate`), re-chosen every `comm.replan_every` steps from the spectra the
    codec measured (every `comm.spectrum_every` steps), the same on every rank.

    The budget covers the whole synchronisation: the codec-independent traffic (row counts, the rest) is taken
    off first, the factors get what is left. The first allocation, at the first synchronize (rows are known
    then), has no spectrum yet: every layer gets the same k, the largest that fits. Layers whose ranks change
    restart their warm start (its shape changed); residuals carry on."""

    def __init__(
        self,
        codec: LayerCodec,
        options: Any,
        world_size: int,
        captures: Callable[[], Sequence[LinearCapture]],
        fixed: Callable[[], float],
    ) -> None:
        self._codec = codec
        self.options = options
        self.world_size = world_size
        self._captures = captures
        self._fixed = fixed
        self.budget = options.budget_bytes
        if self.budget is None:
            self.budget = link_bytes_per_s(options.link_rate) * options.budget_ms / 1e3
        self._rows: dict[str, int] = {}  # the latest synchronised step's rows per layer (max over ranks)
        self.history: list[dict[str, Any]] = []

    @property
    def _ranks(self) -> Any:
        return self._codec.memory.ranks  # type: ignore[attr-defined]

    @property
    def allocated(self) -> bool:
        return bool(self._ranks.per_layer)

    @property
    def ready(self) -> bool:
        return self.allocated

    def codecs(self) -> list[LayerCodec]:
        return [self._codec]

    def codec(self, layer: str) -> LayerCodec:
        return self._codec

    def _allocate(self) -> None:
        codec = self._codec
        bound = self.world_size if codec.name == "rankdad-allreduce" else 1  # the all-reduce form: all ranks' rows
        costs = [
            LayerCost(
                c.name,
                min(c.in_features, c.out_features, bound * self._rows[c.name]),  # the rank a gradient can have
                codec.wire_bytes_per_rank(c.in_features, c.out_features, self.world_size),  # type: ignore[attr-defined]
            )
            for c in self._captures()
            if c.name in self._rows
        ]
        fixed = self._fixed()
        try:
            ranks = allocate(costs, self.budget - fixed, self._ranks.spectra, self._ranks.per_layer or None)
        except ValueError as err:
            raise ValueError(
                f"comm.budget: {err} for the factors (the budget {self.budget:,.0f} B/step less "
                f"{fixed:,.0f} B of row counts and uncaptured gradients)"
            ) from None
        self._ranks.per_layer = ranks
        spent = sum(c.bytes_per_rank * ranks[c.name] for c in costs)
        step = self._codec.memory.step  # type: ignore[attr-defined]
        self.history.append({"step": step, "ranks": dict(ranks), "factor_wire_bytes": spent})
        log.info("rank budget at step %d: %s", step, json.dumps(ranks))

    def apply(self, layers: list[LayerStep]) -> list[LayerStep]:
        self._rows = {layer.capture.name: max(layer.rows) for layer in layers}
        if not self.allocated:
            self._allocate()
        return layers

    def end_step(self, layers: list[LayerStep]) -> None:
        """After the codec's own `end_step`: its step counter (checkpointed) says when to re-plan, from this step's
        rows (`apply` does not see them when the layers were launched during backward)."""
        self._rows = {layer.capture.name: max(layer.rows) for layer in layers} or self._rows
        if self.allocated and self._codec.memory.step % self.options.replan_every == 0:  # type: ignore[attr-defined]
            self._allocate()

    def state_dict(self) -> dict[str, Any]:
        """The ranks and the spectra they are re-planned from, so a resumed run re-plans as an uninterrupted one,
        and the plans made so far (plan.json's history)."""
        return {
            "budget_ranks": dict(self._ranks.per_layer) or None,
            "budget_spectra": dict(self._ranks.spectra),
            "budget_history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ranks.per_layer = dict(state["budget_ranks"] or {})
        self._ranks.spectra = dict(state["budget_spectra"])
        self.history = list(state["budget_history"])

    def describe(
        self, strategy: str, captures: Sequence[LinearCapture], rest: Sequence[str], world_size: int
    ) -> dict[str, Any]:
        return {
            **one_codec_description(strategy, captures, rest, self._codec),
            "budget": {
                "wire_bytes_per_step": self.budget,
                "fixed_wire_bytes_per_step": self._fixed(),
                "rule": "k = 1 per layer, then one rank at a time to the layer whose next σ² buys the most per byte",
                "replan_every": self.options.replan_every,
                "ranks": dict(self._ranks.per_layer),
                "history": self.history,
            },
        }
