"""The dAD family (`dad`, `rankdad`, `auto`): one strategy class, composed of

- a gradient source (`capture.GradientSource`): (A, Δ) of every managed Linear layer, the rest dense;
- a plan (`plan.FixedPlan`, `plan.CostModelPlan`): which codec each captured layer uses (`codecs/`);
- a scheduler (`scheduler.LayerScheduler`): when each layer's collective starts (overlap with backward);
- the rest's codec: `buckets.BucketedMean` (fp32, exact) or `codecs.rest.LossyRest` (`comm.rest_dtype`);
- `Comm`, through which every byte travels and is counted.

The strategies differ only in their plan: `dad` sends every layer's rows (exact), `rankdad` its low-rank factors,
`auto` chooses per layer by the cost model. Everything not captured (biases of captured layers, LayerNorm,
embeddings, uncaptured layers) is all-reduced (mean, bucketed) so replicas never drift. A captured weight that
also got an ordinary gradient from another path has that part all-reduced and added; whether any rank has one
travels in the row-count exchange, so every rank calls the same collectives.

Bytes per step (payload sent by one rank): 8·2L (counts) + Σ_layers codec payload + 4·Σ_rest numel
(+ 4·in·out for a captured weight with an extra dense gradient on any rank); with `comm.rest_dtype` bf16/fp16 the
rest costs 2·Σ_rest numel instead, with int8/fp8 about 1.03·Σ_rest numel (`dtypes.quantized_sum_bytes`).

Gradient accumulation: backward passes inside `no_sync()` only record pairs, which pile up until the next
synchronising backward (exact). With overlap on, a second backward outside `no_sync()` before `synchronize()`
is refused with an error (its pairs would arrive after their layer's collective had started).

Timing: `CommStats.time_s` is the time the step spends blocked in collectives (launch calls and waits);
`scheduler.last_round` reports the last overlapped step per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from .base import CommStats, Strategy
from .buckets import BucketedMean
from .capture import GradientSource, LinearCapture
from .codecs.base import LayerCodec, LayerStep, Pending
from .codecs.factors import FactorsCodec
from .codecs.rest import RESIDUAL, LossyRest
from .codecs.rows import RowsCodec
from .codecs.subspace import SubspaceCodec
from .comm import Comm
from .dtypes import QUANTIZED, quantized_sum_bytes, wire_dtype
from .plan import BudgetPlan, CostModelPlan, FixedPlan
from .scheduler import LayerScheduler


class Plan(Protocol):
    @property
    def ready(self) -> bool:
        """The plan is fixed and applied: layers may be launched during backward."""

    def codecs(self) -> list[LayerCodec]: ...

    def codec(self, layer: str) -> LayerCodec: ...

    def apply(self, layers: list[LayerStep]) -> list[LayerStep]:
        """The layers synchronised through their codecs this step (a plan may release the others)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(
        self, strategy: str, captures: Sequence[LinearCapture], rest: Sequence[str], world_size: int
    ) -> dict[str, Any]: ...

    def end_step(self, layers: list[LayerStep]) -> None:
        """Called once after every synchronised step, after the codecs' own `end_step`, with the layers the step
        synchronised through codecs (launched during backward or by `apply`)."""


class CapturedStrategy(Strategy):
    def __init__(
        self, name: str, options: Any, group: dist.ProcessGroup | None, make_plan: Callable[[CapturedStrategy], Plan]
    ) -> None:
        self.name = name
        self.options = options
        self.comm = Comm(group)
        self.plan = make_plan(self)
        self.source: GradientSource | None = None
        self.rest_sync: BucketedMean | LossyRest | None = None
        self.scheduler = LayerScheduler(name, self.comm, lambda: self.captures, self._launch, self._overlapping)
        self._accumulating = False
        self._synced: list[LayerStep] = []  # the layers the current step synchronised, whichever path launched them

    @property
    def captures(self) -> list[LinearCapture]:
        return self.source.captures if self.source is not None else []

    # ------------------------------------------------------------------ setup
    def attach(self, model: nn.Module) -> nn.Module:
        self.source = GradientSource(model)
        for codec in self.plan.codecs():
            codec.bind([c.name for c in self.source.captures])
        self.rest_sync = self._rest_sync()
        for capture in self.source.captures:
            capture.on_delta = self.scheduler.on_delta
        return model

    def _rest_sync(self, state: dict[str, Any] | None = None) -> BucketedMean | LossyRest:
        """How the uncaptured gradients travel: fp32 buckets (exact), or 16/8-bit with error feedback."""
        assert self.source is not None
        if self.options.rest_dtype == "fp32":
            return BucketedMean(self.source.rest, self.options.bucket_mb, prefix=f"{self.name}/rest")
        rest = LossyRest(
            self.source.rest, self.options.rest_dtype, self.options.error_feedback, prefix=f"{self.name}/rest"
        )
        if state:
            rest.load_state_dict(state)
        return rest

    def release(self, layers: list[LayerStep]) -> None:
        """Hand captured layers back to autograd (a plan chose all-reduce for them); they join the rest's buckets,
        which are planned again once."""
        assert self.source is not None
        if not layers:
            return
        for layer in layers:
            self.source.release(layer.capture, layer.a, layer.delta)
        self.rest_sync = self._rest_sync(self._rest_state())

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only record pairs (exact accumulation); nothing is launched early."""
        self._accumulating, before = True, self._accumulating
        try:
            yield
        finally:
            self._accumulating = before

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

    # ------------------------------------------------------------------ one step
    def _overlapping(self) -> bool:
        """Whether this step's layers go through the overlapped path. The same on every rank: it depends on
        configuration and on state every rank shares, never on timing or data."""
        return bool(self.options.overlap) and bool(self.captures) and not self._accumulating and self.plan.ready

    def _launch(self, layer: LayerStep) -> Pending:
        return self.plan.codec(layer.capture.name).launch(layer, self.comm)

    def _by_codec(self, layers: Sequence[Any], layer_of: Callable[[Any], LayerStep]) -> list[tuple[LayerCodec, list]]:
        """`layers` grouped by their codec, codecs in order of first appearance (the same on every rank)."""
        groups: dict[int, tuple[LayerCodec, list]] = {}
        for item in layers:
            codec = self.plan.codec(layer_of(item).capture.name)
            groups.setdefault(id(codec), (codec, []))[1].append(item)
        return list(groups.values())

    def _launch_all(self, layers: list[LayerStep]) -> list[Pending]:
        """After backward: launch every layer, codec by codec, so a codec can coalesce its layers' collectives."""
        return [p for codec, group in self._by_codec(layers, lambda la: la) for p in codec.launch_all(group, self.comm)]

    def _finish_all(self, pendings: list[Pending]) -> None:
        """Decode every launched layer, codec by codec in order of first appearance (the same on every rank), so
        a codec can coalesce the collectives its decode needs (`LayerCodec.finish_all`)."""
        for codec, group in self._by_codec(pendings, lambda p: p.layer):
            for pending, grad in zip(group, codec.finish_all(group, self.comm)):
                self._synced.append(pending.layer)
                self._set_weight_grad(pending.layer, grad)

    @torch.no_grad()
    def synchronize(self) -> CommStats:
        if self.rest_sync is None:
            raise RuntimeError(f"{self.name}: synchronize() before attach()")
        self._synced = []
        if self._overlapping():
            self.scheduler.finish_round(self._finish_all)
        else:
            # every layer's collective is queued before the first wait, so the link never idles while a rank
            # combines one layer or compresses the next, and a slow peer's lag is waited out once, not per layer
            self._finish_all(self._launch_all(self.plan.apply(self.scheduler.collect())))
        self.rest_sync(self.comm)
        for codec in self.plan.codecs():
            codec.end_step()
        self.plan.end_step(self._synced)
        return self.comm.reset()

    def fixed_wire_bytes(self) -> float:
        """Wire bytes per rank per step that do not depend on any codec's choice: the row-count exchange (two
        int64 per captured layer, all-gathered) and the rest (fp32 ring all-reduce, `LossyRest` in 16 or 8 bits)."""
        S = self.comm.world_size
        counts = (S - 1) * 16 * len(self.captures)
        rest = sum(p.numel() for _, p in (self.source.rest if self.source is not None else []))
        if self.options.rest_dtype == "fp32":
            return counts + 2.0 * (S - 1) / S * 4 * rest
        if self.options.rest_dtype in QUANTIZED:  # LossyRest: the quantized all-reduce at every S (none if empty)
            return counts + (2.0 * (S - 1) / S * quantized_sum_bytes(self.options.rest_dtype, rest, S) if rest else 0)
        per_rank = (S - 1) if S <= 2 else 2.0 * (S - 1) / S  # LossyRest: all-gather, then all-reduce
        return counts + per_rank * wire_dtype(self.options.rest_dtype).itemsize * rest

    def _set_weight_grad(self, layer: LayerStep, grad: torch.Tensor | None) -> None:
        weight = layer.capture.weight
        if layer.dense_anywhere:
            dense = weight.grad if weight.grad is not None else torch.zeros_like(weight)
            dense = self.comm.all_reduce_(dense.contiguous(), f"{layer.capture.name}/dense")
            dense.div_(self.comm.world_size)
            grad = dense if grad is None else grad.add_(dense)
        if grad is not None:
            weight.grad = grad

    def rescale_memory(self, ratio: float) -> None:
        for codec in self.plan.codecs():
            codec.rescale_memory(ratio)
        if isinstance(self.rest_sync, LossyRest):
            self.rest_sync.memory.rescale_(ratio)

    # ------------------------------------------------------------------ checkpoints, plan.json
    def _rest_state(self) -> dict[str, Any]:
        return self.rest_sync.state_dict() if isinstance(self.rest_sync, LossyRest) else {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for codec in self.plan.codecs():
            state.update(codec.state_dict())
        return {**state, **self._rest_state(), **self.plan.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)

        def take(part: Any) -> dict[str, Any]:
            """The keys `part` writes, taken out of `state` (a part's own keys: those of its `state_dict`)."""
            keys = list(part.state_dict())
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"{self.name}: strategy state lacks {', '.join(missing)} (saved by another strategy?)")
            return {k: state.pop(k) for k in keys}

        for codec in self.plan.codecs():
            codec.load_state_dict(take(codec))
        residual = state.pop(RESIDUAL, None)
        if residual is not None and isinstance(self.rest_sync, LossyRest):
            self.rest_sync.load_state_dict({RESIDUAL: residual})
        self.plan.load_state_dict(take(self.plan))
        super().load_state_dict(state)  # refuses whatever is left

    def describe(self) -> dict[str, Any]:
        rest = [n for n, _ in self.source.rest] if self.source is not None else []
        return self.plan.describe(self.name, self.captures, rest, self.comm.world_size)


# ---------------------------------------------------------------------------------------------- the three plans


def build_dad(options: Any, group: dist.ProcessGroup | None = None) -> CapturedStrategy:
    """`dad`: every captured layer sends its (A, Δ) rows. Exact."""
    return CapturedStrategy("dad", options, group, lambda s: FixedPlan(RowsCodec()))


def build_rankdad(options: Any, group: dist.ProcessGroup | None = None) -> CapturedStrategy:
    """`rankdad`: every captured layer sends k low-rank factors of its Δᵀ A (all-gathered, `oneway`/`twoway`),
    or finds the summed gradient's subspace by all-reduce (`allreduce`). Lossy."""
    codec = SubspaceCodec if options.rankdad_mode in ("allreduce", "alternating") else FactorsCodec
    if options.budget_bytes is None and options.budget_ms is None:
        return CapturedStrategy("rankdad", options, group, lambda s: FixedPlan(codec(options)))
    return CapturedStrategy(
        "rankdad",
        options,
        group,
        lambda s: BudgetPlan(
            codec(options), options, s.comm.world_size, captures=lambda: s.captures, fixed=s.fixed_wire_bytes
        ),
    )


def build_auto(options: Any, group: dist.ProcessGroup | None = None) -> CapturedStrategy:
    """`auto`: per layer the cheapest of all-reduce, rows, all-gathered factors and all-reduced factors under the
    byte cost model at this world size."""
    return CapturedStrategy(
        "auto",
        options,
        group,
        lambda s: CostModelPlan(
            RowsCodec(),
            [FactorsCodec(options), SubspaceCodec(options)],
            options,
            s.comm.world_size,
            s.comm.rank == 0,
            captures=lambda: s.captures,
            release=s.release,
        ),
    )
