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
+ 4·Σ_rest numel (+ 4·in·out for a captured weight with an extra dense gradient on any rank). With
`comm.rest_dtype` bf16/fp16 the rest costs 2·Σ_rest numel instead (`LowPrecisionRest`: one all-gather, error
feedback; lossy, so `dad` is then no longer exact).

Gradient accumulation: backward passes inside `no_sync()` only record pairs, which pile up until the next
synchronising backward (exact). With overlap on, a second backward outside `no_sync()` before `synchronize()`
is refused with an error (its pairs would arrive after their layer's collective had started).

Without overlap, `synchronize()` queues every layer's collective before it waits for the first, so the link
does not idle while a rank combines one layer or compresses the next.

Overlap (`comm.overlap`, default on): each layer's collective starts in backward, from the capture's
`on_delta` callback, as soon as its last Δ has arrived, and runs (gloo/NCCL `async_op`) while the rest of
backward computes; `synchronize()` launches whatever is left, then waits. All ranks must call the same
collectives in the same order whatever the timing, so:

- at the first Δ of a step every rank exchanges its per-layer rows, known since forward
  (`LinearCapture.forward_rows`), together with its launch order in the same int64 (rows·2^20 + position):
  layers sorted by the reverse of their first grad-enabled call in forward, which is the order backward
  completes them in for a feed-forward model. If any rank's order differs (data-dependent control flow), no
  layer is launched early this step; all go in registration order from `synchronize()`.
- a layer is launched only after every layer before it in that order, so a rank never skips ahead;
- the extra-dense flags are known only after backward: they travel in a second int64 exchange in
  `synchronize()`. The two exchanges carry L values each, i.e. the same 16·L bytes as the single exchange
  without overlap; the delivered gradients are the same bits either way.
Inside `no_sync()` nothing is launched (the pairs pile up for the next synchronising backward).

Timing: `CommStats.time_s` is the time the step spends blocked in collectives (launch calls and waits).
`last_overlap` (not in CommStats.extra, whose values are identical on every rank) holds the last step's sum
of launch-to-completion intervals of the layer collectives (`inflight_s`) and how many layers were launched
before backward ended (`layers_in_backward`); `trace`, when set to a list, collects per-layer timestamps.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .base import CommStats, Strategy
from .buckets import BucketedMean, grad_or_zeros
from .capture import LinearCapture, attach_linears
from .comm import AsyncGather, Comm


@dataclass
class LayerStep:
    """One captured weight's data for this step, after the counts exchange (identical metadata on all ranks)."""

    capture: LinearCapture
    a: torch.Tensor
    delta: torch.Tensor
    rows: list[int]  # rows per rank, rank order
    dense_anywhere: bool  # some rank accumulated an ordinary gradient into weight.grad


_POSITION_BITS = 20  # overlap: rows and launch position share one int64 of the rows exchange
_REST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Launched:
    """One layer's collective in flight: what `_finish` needs to turn it into the weight gradient."""

    layer: LayerStep
    gather: Optional[AsyncGather]  # None: nothing to send (no rows anywhere, or k = 0)
    data: dict[str, Any] = field(default_factory=dict)
    in_backward: bool = False


@dataclass
class _Round:
    """One step's overlap state, identical on every rank after the rows exchange."""

    rows: list[list[int]]  # rows[r][i]: layer i's rows on rank r
    order: list[int]  # capture indices in launch order
    early: bool  # False when the ranks' orders differ: nothing is launched before synchronize()
    next: int = 0
    launched: dict[int, Launched] = field(default_factory=dict)

    def gathers(self) -> list[AsyncGather]:
        return [item.gather for item in self.launched.values() if item.gather is not None]


class LowPrecisionRest:
    """`comm.rest_dtype` bf16/fp16: the gradients a dAD strategy does not capture (biases, LayerNorms,
    embeddings, uncaptured layers) travel as one flat 16-bit vector per rank in one all-gather, and every rank
    sums the S vectors in fp32 in rank order (so all ranks get bitwise the same mean). With
    `comm.error_feedback` each rank keeps what its own cast dropped and adds it to the next step's vector, so
    nothing is lost in the long run. Payload: 2 bytes per element instead of 4 (the fp32 all-reduce); wire
    (S−1)× payload, i.e. the same as the fp32 ring all-reduce at S = 2."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], dtype: torch.dtype, error_feedback: bool,
                 prefix: str) -> None:
        self.params = params
        self.dtype = dtype
        self.error_feedback = error_feedback
        self.prefix = prefix
        self.residual: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for _, p in self.params) * torch.empty((), dtype=self.dtype).element_size()

    def __call__(self, comm: Comm) -> None:
        if not self.params:
            return
        grads = [grad_or_zeros(p) for _, p in self.params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        if self.residual is not None:
            if self.residual.shape != flat.shape:
                raise ValueError(f"{self.prefix}: error-feedback residual of {self.residual.numel()} elements for "
                                 f"{flat.numel()} gradient elements (state from another model?)")
            flat += self.residual
        sent = flat.to(self.dtype)
        if self.error_feedback and bool(torch.isfinite(flat).all()):
            self.residual = flat - sent.to(torch.float32)
        parts = comm.all_gather(sent, f"{self.prefix}/{str(self.dtype).split('.')[-1]}")
        total = parts[0].to(torch.float32)
        for part in parts[1:]:
            total += part.to(torch.float32)
        total /= comm.world_size
        for g, chunk in zip(grads, total.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.residual is None else {"rest_residual": self.residual.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residual = state.get("rest_residual")
        self.residual = None if residual is None else residual.clone()


class DAD(Strategy):
    name = "dad"
    exact = True

    def __init__(self, cfg, group: Optional[dist.ProcessGroup] = None) -> None:
        self.cfg = cfg
        self.comm = Comm(group)
        self.captures: list[LinearCapture] = []
        self.rest: list[tuple[str, nn.Parameter]] = []
        self.rest_mean: Optional[BucketedMean | LowPrecisionRest] = None
        self._round: Optional[_Round] = None
        self._accumulating = False
        self._in_backward = False
        #: when a list, every layer collective of every step appends a record (the overlap benchmark)
        self.trace: Optional[list[dict[str, Any]]] = None
        self.last_overlap: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def attach(self, model: nn.Module) -> nn.Module:
        self.captures = attach_linears(model)
        managed = {id(c.weight) for c in self.captures}
        self.rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in managed]
        self.rest_mean = self._rest_sync()
        for capture in self.captures:
            capture.on_delta = self._on_delta
        return model

    def _rest_sync(self, residual: Optional[dict[str, Any]] = None) -> BucketedMean | LowPrecisionRest:
        """How the uncaptured gradients travel: fp32 buckets (exact), or 16-bit with error feedback."""
        if self.cfg.rest_dtype == "fp32":
            return BucketedMean(self.rest, self.cfg.bucket_mb, prefix=f"{self.name}/rest")
        rest = LowPrecisionRest(self.rest, _REST_DTYPES[self.cfg.rest_dtype], self.cfg.error_feedback,
                                prefix=f"{self.name}/rest")
        if residual:
            rest.load_state_dict(residual)
        return rest

    def _rest_state(self) -> dict[str, Any]:
        return self.rest_mean.state_dict() if isinstance(self.rest_mean, LowPrecisionRest) else {}

    def state_dict(self) -> dict[str, Any]:
        return self._rest_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        residual = state.pop("rest_residual", None)
        if residual is not None and isinstance(self.rest_mean, LowPrecisionRest):
            self.rest_mean.load_state_dict({"rest_residual": residual})
        super().load_state_dict(state)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only record pairs (exact accumulation); nothing is launched early."""
        self._accumulating, before = True, self._accumulating
        try:
            yield
        finally:
            self._accumulating = before

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
        if self._overlapping():
            self._synchronize_overlapped()
        else:
            # every layer's collective is queued before the first wait, so the link never idles while a rank
            # combines one layer or compresses the next, and a slow peer's lag is waited out once, not per layer
            for launched in [self._launch(layer) for layer in self._plan(self._collect())]:
                self._set_weight_grad(launched.layer, self._finish(launched))
        self.rest_mean(self.comm)
        return self.comm.reset()

    # ------------------------------------------------------------------ overlap
    def _overlapping(self) -> bool:
        """Whether this step's layers go through the overlapped path. Must be the same on every rank: it
        depends on configuration and on state every rank shares, never on timing or data."""
        return bool(self.cfg.overlap) and bool(self.captures) and not self._accumulating and self._overlap_ready()

    def _overlap_ready(self) -> bool:
        """Hook for `auto`: no overlap before its plan is made and applied."""
        return True

    def _on_delta(self, capture: LinearCapture) -> None:
        if not self._overlapping():
            return
        with torch.no_grad():
            if self._round is None:
                self._round = self._open_round()
            self._in_backward = True
            for gather in self._round.gathers():
                gather.poll()
            try:
                self._advance(ready_only=True)
            finally:
                self._in_backward = False

    def _open_round(self) -> _Round:
        """The rows exchange: per layer rows·2^20 + launch position, one int64 per layer and rank."""
        n = len(self.captures)
        called = sorted((c.first_call, i) for i, c in enumerate(self.captures) if c.first_call is not None)
        order = [i for _, i in reversed(called)] + [i for i, c in enumerate(self.captures) if c.first_call is None]
        position = {i: pos for pos, i in enumerate(order)}
        words = [(c.forward_rows << _POSITION_BITS) | position[i] for i, c in enumerate(self.captures)]
        table = self.comm.exchange_counts(words, "meta/rows")
        positions = [[w & ((1 << _POSITION_BITS) - 1) for w in t] for t in table]
        rows = [[w >> _POSITION_BITS for w in t] for t in table]
        early = all(p == positions[0] for p in positions)
        return _Round(rows=rows, order=order if early else list(range(n)), early=early)

    def _advance(self, ready_only: bool) -> None:
        """Launch layers in the round's order: with `ready_only`, only while the next one has all its Δ."""
        rnd = self._round
        assert rnd is not None
        while rnd.next < len(rnd.order):
            i = rnd.order[rnd.next]
            capture = self.captures[i]
            if ready_only and (not rnd.early or capture.pending > 0):
                return
            a, delta = capture.take(reset_dense=False)
            rows = [t[i] for t in rnd.rows]
            if a.shape[0] > rows[self.comm.rank]:
                raise RuntimeError(f"{self.name}: {capture.name} recorded {a.shape[0]} rows but its forward "
                                   f"calls announced {rows[self.comm.rank]}")
            launched = self._launch(LayerStep(capture, a, delta, rows, False))
            launched.in_backward = self._in_backward
            rnd.launched[i] = launched
            rnd.next += 1

    def _synchronize_overlapped(self) -> None:
        if self._round is None:  # no Δ arrived on this rank (or no backward): exchange rows now
            self._round = self._open_round()
        rnd, self._round = self._round, None
        for gather in rnd.gathers():
            gather.poll()
        self._advance_all(rnd)
        late = [c.name for c in self.captures if c.recorded_rows]
        if late:
            for gather in rnd.gathers():  # leave no collective in flight behind the error
                gather.wait()
            for capture in self.captures:
                capture.take()
            raise RuntimeError(f"{self.name}: {', '.join(late)} recorded pairs after their collective had started "
                               "(a second backward before synchronize()): wrap the accumulating backward passes "
                               "in strategy.no_sync(), or set comm.overlap=false")
        dense = self.comm.exchange_counts([int(c.dense_grad_arrived) for c in self.captures], "meta/dense")
        inflight = early = 0.0
        for i in rnd.order:
            launched = rnd.launched[i]
            launched.layer.dense_anywhere = any(t[i] for t in dense)
            launched.layer.capture.reset_dense()
            grad = self._finish(launched)
            self._set_weight_grad(launched.layer, grad)
            if launched.gather is not None:
                g = launched.gather
                inflight += (g.done or time.perf_counter()) - g.launched
                early += launched.in_backward
                if self.trace is not None:
                    self.trace.append({"layer": launched.layer.capture.name, "launched": g.launched,
                                       "done": g.done, "in_backward": launched.in_backward, "bytes": g.nbytes})
        self.last_overlap = {"inflight_s": inflight, "layers_in_backward": early, "layers": float(len(rnd.order))}

    def _advance_all(self, rnd: _Round) -> None:
        self._round = rnd
        try:
            self._advance(ready_only=False)
        finally:
            self._round = None

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

    def _gather(self, tensor: torch.Tensor, name: str) -> AsyncGather:
        return self.comm.all_gather_async(tensor, name)

    def _launch(self, layer: LayerStep) -> Launched:
        """Start the layer's collective: its (A, Δ) rows packed side by side, padded to the most rows."""
        n_max = max(layer.rows)
        if n_max == 0:
            return Launched(layer, None)
        packed = torch.cat([layer.a, layer.delta], dim=1)
        if packed.shape[0] < n_max:
            packed = torch.cat([packed, packed.new_zeros((n_max - packed.shape[0], packed.shape[1]))])
        return Launched(layer, self._gather(packed, layer.capture.name))

    def _finish(self, launched: Launched) -> Optional[torch.Tensor]:
        """Σ_i Δ_iᵀ A_i / S from the gathered pairs; None when no rank recorded a row."""
        layer = launched.layer
        if launched.gather is None:
            return None
        c = layer.capture
        parts = launched.gather.wait()
        rows = torch.cat([p[:n] for p, n in zip(parts, layer.rows)])
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
