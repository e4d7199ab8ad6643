"""When each captured layer's collective starts: `LayerScheduler`.

Two ways, chosen per step identically on every rank (the choice depends on configuration and shared state,
never on timing or data):

Without overlap, `collect()` takes every layer's pairs after backward and exchanges (rows, extra-dense flag) of
all layers in one small all-gather; the caller then queues every layer's collective before it waits for the
first, so the link does not idle while a rank combines one layer or compresses the next.

With overlap (`comm.overlap`), each layer's collective starts in backward, from the capture's `on_delta`
callback, as soon as its last Δ has arrived, and runs (gloo/NCCL `async_op`) while the rest of backward computes;
`finish_round()` launches whatever is left, then the caller's `finish_all` decodes the layers in launch order. All
ranks must call the same collectives in the same order whatever the timing, so:

- at the first Δ of a step every rank exchanges its per-layer rows, known since forward
  (`LinearCapture.forward_rows`), together with its launch order in the same int64 (rows·2^20 + position):
  layers sorted by the reverse of their first grad-enabled call in forward, which is the order backward
  completes them in for a feed-forward model. If any rank's order differs (data-dependent control flow), no
  layer is launched early this step; all go in registration order from `finish_round()`.
- a layer is launched only after every layer before it in that order, so a rank never skips ahead;
- the extra-dense flags are known only after backward: they travel in a second int64 exchange. The two
  exchanges carry L values each, i.e. the same 16·L bytes as the single exchange without overlap; the delivered
  gradients are the same bits either way.

`last_round` reports the last overlapped step: per layer when its collective was launched and completed, whether
it was launched during backward, and its bytes (the overlap benchmark reads it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .codecs.base import LayerStep, Pending
from .comm import Comm

_POSITION_BITS = 20  # rows and launch position share one int64 of the rows exchange


class Capture(Protocol):
    """What the scheduler reads of a capture (`capture.LinearCapture`; tests use fakes)."""

    name: str
    pending: int
    forward_rows: int
    first_call: int | None
    dense_grad_arrived: bool

    @property
    def recorded_rows(self) -> int: ...

    def take(self, reset_dense: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...

    def reset_dense(self) -> None: ...


@dataclass
class LayerRecord:
    """One layer's collective in the last overlapped step (perf_counter stamps)."""

    layer: str
    launched: float
    done: float | None
    in_backward: bool
    bytes: int


@dataclass
class RoundReport:
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def layers_in_backward(self) -> int:
        return sum(r.in_backward for r in self.layers)

    @property
    def inflight_s(self) -> float:
        """Sum over layers of launch-to-completion time."""
        return sum((r.done or r.launched) - r.launched for r in self.layers)


@dataclass
class _Round:
    """One step's overlap state, identical on every rank after the rows exchange."""

    rows: list[list[int]]  # rows[r][i]: layer i's rows on rank r
    order: list[int]  # capture indices in launch order
    early: bool  # False when the ranks' orders differ: nothing is launched before finish_round()
    next: int = 0
    launched: dict[int, Pending] = field(default_factory=dict)

    def gathers(self) -> list:
        return [item.gather for item in self.launched.values() if item.gather is not None]


class LayerScheduler:
    """`captures()` returns the layers currently captured (a plan may release some after the first step);
    `launch` starts one layer's collective (the layer's codec); `overlapping()` says whether this step overlaps."""

    def __init__(
        self,
        name: str,
        comm: Comm,
        captures: Callable[[], Sequence[Capture]],
        launch: Callable[[LayerStep], Pending],
        overlapping: Callable[[], bool],
    ) -> None:
        self.name = name  # the strategy's, for messages
        self.comm = comm
        self.captures = captures
        self.launch = launch
        self.overlapping = overlapping
        self._round: _Round | None = None
        self._in_backward = False
        self.last_round = RoundReport()

    # ------------------------------------------------------------------ without overlap
    def collect(self) -> list[LayerStep]:
        """Take every capture's pairs and exchange (rows, extra-dense flag) of all layers in one collective."""
        self.last_round = RoundReport()  # this step is not overlapped
        captures = self.captures()
        if not captures:
            return []
        dense = [int(c.dense_grad_arrived) for c in captures]
        taken = [c.take() for c in captures]
        table = self.comm.exchange_counts([a.shape[0] for a, _ in taken] + dense)
        n = len(captures)
        return [
            LayerStep(c, a, d, [t[i] for t in table], any(t[n + i] for t in table))
            for i, (c, (a, d)) in enumerate(zip(captures, taken))
        ]

    # ------------------------------------------------------------------ with overlap
    def on_delta(self, capture: Capture) -> None:
        """The captures' `on_delta` callback: launch every layer that is ready, in order."""
        if not self.overlapping():
            return
        with torch.no_grad():
            if self._round is None:
                self._round = self._open_round()
            self._in_backward = True
            for gather in self._round.gathers():
                gather.poll()
            try:
                self._advance(self._round, ready_only=True)
            finally:
                self._in_backward = False

    def _open_round(self) -> _Round:
        """The rows exchange: per layer rows·2^20 + launch position, one int64 per layer and rank."""
        captures = self.captures()
        called = sorted((c.first_call, i) for i, c in enumerate(captures) if c.first_call is not None)
        order = [i for _, i in reversed(called)] + [i for i, c in enumerate(captures) if c.first_call is None]
        position = {i: pos for pos, i in enumerate(order)}
        words = [(c.forward_rows << _POSITION_BITS) | position[i] for i, c in enumerate(captures)]
        table = self.comm.exchange_counts(words, "meta/rows")
        positions = [[w & ((1 << _POSITION_BITS) - 1) for w in t] for t in table]
        rows = [[w >> _POSITION_BITS for w in t] for t in table]
        early = all(p == positions[0] for p in positions)
        return _Round(rows=rows, order=order if early else list(range(len(captures))), early=early)

    def _advance(self, rnd: _Round, ready_only: bool) -> None:
        """Launch layers in the round's order: with `ready_only`, only while the next one has all its Δ."""
        captures = self.captures()
        while rnd.next < len(rnd.order):
            i = rnd.order[rnd.next]
            capture = captures[i]
            if ready_only and (not rnd.early or capture.pending > 0):
                return
            a, delta = capture.take(reset_dense=False)
            rows = [t[i] for t in rnd.rows]
            if a.shape[0] > rows[self.comm.rank]:
                raise RuntimeError(
                    f"{self.name}: {capture.name} recorded {a.shape[0]} rows but its forward calls announced "
                    f"{rows[self.comm.rank]}"
                )
            pending = self.launch(LayerStep(capture, a, delta, rows, False))
            pending.in_backward = self._in_backward
            rnd.launched[i] = pending
            rnd.next += 1

    def finish_round(self, finish_all: Callable[[list[Pending]], None]) -> None:
        """After backward: launch what is left, exchange the extra-dense flags, then `finish_all` the layers in
        launch order."""
        rnd = self._round if self._round is not None else self._open_round()  # no Δ arrived on this rank
        self._round = None
        for gather in rnd.gathers():
            gather.poll()
        self._advance(rnd, ready_only=False)
        captures = self.captures()
        late = [c.name for c in captures if c.recorded_rows]
        if late:
            for gather in rnd.gathers():  # leave no collective in flight behind the error, start none
                gather.drain()
            for capture in captures:
                capture.take()
            raise RuntimeError(
                f"{self.name}: {', '.join(late)} recorded pairs after their collective had started (a second "
                "backward before synchronize()): wrap the accumulating backward passes in "
                "strategy.no_sync(), or set comm.overlap=false"
            )
        dense = self.comm.exchange_counts([int(c.dense_grad_arrived) for c in captures], "meta/dense")
        for i in rnd.order:
            pending = rnd.launched[i]
            pending.layer.dense_anywhere = any(t[i] for t in dense)
            pending.layer.capture.reset_dense()
        finish_all([rnd.launched[i] for i in rnd.order])
        report = RoundReport()
        for i in rnd.order:
            pending = rnd.launched[i]
            g = pending.gather
            if g is not None:
                report.layers.append(
                    LayerRecord(
                        pending.layer.capture.name,
                        g.launched,
                        g.done or time.perf_counter(),
                        pending.in_backward,
                        g.nbytes,
                    )
                )
        self.last_round = report
