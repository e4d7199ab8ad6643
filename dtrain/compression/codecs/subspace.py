"""`SubspaceCodec`: rank-dAD's all-reduce forms (`comm.rankdad_mode: allreduce` and `alternating`). Lossy.

The all-gather forms (`FactorsCodec`) send each rank's own factors, so every rank receives (S−1) × payload and the
wire bytes grow with the world size. This form finds the subspace of the SUMMED gradient M = Σ_i M_i jointly, with
the sums done by all-reduce, whose ring puts 2(S−1)/S × payload on each link whatever S is:

    P_i = M_i Q = Δ_iᵀ (A_i Q)  (+ E_i Q)         out × k, from the captured rows: M_i is never formed
    P   = Σ_i P_i                                 all-reduce 1
    P̂   = orth(P)                                 the same on every rank (the same P)
    Q_i = M_iᵀ P̂ = A_iᵀ (Δ_i P̂)  (+ E_iᵀ P̂)       in × k
    Q   = Σ_i Q_i                                 all-reduce 2
    G   = P̂ Qᵀ / S                               the delivered mean gradient, bitwise the same on every rank

Q starts from the previous step's Q (`warm_start`; the same on every rank, since it is an all-reduce result) or
from a Gaussian seeded by (layer, step). With `power_iters` = n the two all-reduces run n times (Q ← Q as the next
start within the step). k = min(comm.rank, in, out, Σ_i rows_i): the summed gradient has rank ≤ Σ_i rows_i.

This is PowerSGD's power step, computed from dAD's captured factors: without error feedback no rank ever forms an
out × in matrix, and the bytes are k(in+out) per layer and iteration, at 2(S−1)/S on the wire. The price against
the all-gather forms is one more round trip per layer (the second all-reduce waits for the first).

`alternating` does half of that power step per step, one all-reduce instead of two: on even steps
P = Σ_i M_i Q̂ with Q̂ = orth(the last Q), G = P Q̂ᵀ / S; on odd steps Q = Σ_i M_iᵀ P̂ with P̂ = orth(the last P),
G = P̂ Qᵀ / S. Each step's G is the summed gradient projected on the subspace the previous step found (the power
iteration runs across steps, as PowerSGD's warm start already makes it), so a step costs k·out or k·in elements
instead of k(in+out) and one round trip instead of two; error feedback keeps what the stale subspace misses.
Needs `warm_start` and one power iteration. The side follows what the layer has stored, the same on every rank:
after a P step its P is kept transposed (k × out) and the next step is a Q step; after a Q step its Q (in × k)
is kept and the next is a P step; anything else (the first step, a changed k, a checkpoint of the `allreduce`
form) starts a P step. So a step that leaves the memory as it was (a non-finite step undone, a layer without
rows) does not break the alternation. A rank budget is planned with the larger side, k·max(in, out), so it
holds at every step.

Error feedback (`error_feedback`, `memory.ErrorFeedback`): rank i delivered P̂ Q_iᵀ of its compensated M_i + E_i,
so its residual is M_i + E_i − P̂ Q_iᵀ (exact, since Σ_i P̂ Q_iᵀ / S = G); this needs the dense M_i + E_i, as in the
other forms. Factors travel in `factor_dtype` (bf16/fp16 sums lose precision, as PowerSGD's 16-bit compression
does) and the residual counts what the cast dropped. A step whose decoded gradients are not all finite leaves the
residuals and warm starts as they were (`end_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ... import metrics
from ..capture import LinearCapture
from ..comm import AsyncQuantizedReduce, AsyncReduce, Comm
from ..dtypes import QUANTIZED, summed_value_bytes, wire_dtype
from ..lowrank import Dense, OuterProduct, effective_rank, orthonormalize
from .base import LayerCodec, LayerStep, Pending
from .factor_memory import FactorMemory


class _Share:
    """One tensor's part of a coalesced sum over ranks in flight, standing in for its own collective in a `Pending`:
    `wait()` gives its sum, `mine()` what this rank contributed as the wire carried it (error feedback's delivered
    share; None unless it was asked for), both in the tensor's shape and dtype. `handle` is the collective
    (`AsyncReduce` or `AsyncQuantizedReduce`), whose timing the overlap scheduler reads; `delivered` gives the
    whole flat delivered buffer; `transposed`: the tensor was flattened column after column."""

    def __init__(
        self,
        handle: AsyncReduce | AsyncQuantizedReduce,
        delivered: Callable[[], torch.Tensor] | None,
        span: tuple[int, int],
        like: torch.Tensor,
        transposed: bool,
    ) -> None:
        self.handle, self._delivered, self._span = handle, delivered, span
        self._shape, self._dtype, self._transposed = like.shape, like.dtype, transposed

    # the collective's timing and size, for the overlap scheduler's report
    def poll(self) -> None:
        self.handle.poll()

    def drain(self) -> None:
        self.handle.drain()

    @property
    def launched(self) -> float:
        return self.handle.launched

    @property
    def done(self) -> float | None:
        return self.handle.done

    @property
    def nbytes(self) -> int:
        return self.handle.nbytes

    def _view(self, flat: torch.Tensor) -> torch.Tensor:
        part = flat[self._span[0] : self._span[1]]
        rows, cols = self._shape
        return (part.view(cols, rows).T if self._transposed else part.view(rows, cols)).to(self._dtype)

    def wait(self) -> torch.Tensor:
        return self._view(self.handle.wait())

    def mine(self) -> torch.Tensor | None:
        return None if self._delivered is None else self._view(self._delivered())


class SubspaceCodec(LayerCodec):
    name = "rankdad-allreduce"

    def __init__(self, options: Any) -> None:
        self.options = options
        # 8-bit factors are summed by a quantized all-reduce (`Comm.all_reduce_quantized_async`), others cast
        self.quantized = options.factor_dtype in QUANTIZED
        self.factor_dtype = None if self.quantized else wire_dtype(options.factor_dtype)
        # auto builds this codec from its own options too, whose rankdad_mode names its all-gather form
        self.mode = "alternating" if options.rankdad_mode == "alternating" else "allreduce"
        self.alternating = self.mode == "alternating"
        self.memory = FactorMemory(options, prefix="subspace_", codec=f"rankdad ({self.mode} mode)")

    def bind(self, layer_names: list[str]) -> None:
        self.memory.bind(layer_names)
        self._position = {name: i for i, name in enumerate(layer_names)}

    def rank_for(self, in_features: int, out_features: int, rows: int, name: str | None = None) -> int:
        """k for a layer whose ranks hold `rows` rows IN TOTAL (the rank bound of the summed gradient): comm.rank,
        or the layer's rank from a budget."""
        return self.memory.ranks.rank(name, in_features, out_features, rows)

    def _reduce_all(self, comm: Comm, tensors: list[torch.Tensor], names: list[str], keep_mine: bool) -> list[_Share]:
        """One all-reduce of all `tensors` (the layers' out × k or in × k factors, flattened into one buffer in the
        wire format, so L layers cost one round trip instead of L); per tensor a `_Share`. With `keep_mine` its
        `mine()` is what this rank delivered: the cast it sent, or (8-bit) its tensor plus what its encodings lost
        (`AsyncQuantizedReduce`)."""
        label = f"{self.name}/{names[0].rsplit('/', 1)[-1]}"
        spans, offset = [], 0
        for t in tensors:
            spans.append((offset, offset + t.numel()))
            offset += t.numel()
        if self.quantized:
            # column after column, so that a block of values shares one column's scale
            flat = torch.cat([t.T.reshape(-1).float() for t in tensors])
            values_of = {n: t.numel() for n, t in zip(names, tensors)}
            handle = comm.all_reduce_quantized_async(flat, label, self.options.factor_dtype, values_of)
            delivered = handle.delivered if keep_mine else None
        else:
            flat = torch.cat([t.reshape(-1).to(self.factor_dtype) for t in tensors])
            size = flat.element_size()
            # copied before the launch: the all-reduce overwrites `flat` in place
            sent = flat.clone() if keep_mine else None
            handle = comm.all_reduce_async(flat, label, {n: t.numel() * size for n, t in zip(names, tensors)})
            delivered = None if sent is None else lambda: sent
        return [_Share(handle, delivered, span, t, self.quantized) for span, t in zip(spans, tensors)]

    def _in_order(self, items: list, layer_of: Callable[[Any], LayerStep]) -> list:
        """`items` in registration order of their layers, the layout of a coalesced buffer."""
        return sorted(items, key=lambda item: self._position[layer_of(item).capture.name])

    def _start(self, layer: LayerStep) -> tuple[dict[str, Any], torch.Tensor] | None:
        """This rank's first factor for one layer, with what `finish_all` needs; None when k = 0: P_i = M_i Q,
        or in alternating mode P_i = M_i Q̂ (a P step) or Q_i = M_iᵀ P̂ (a Q step), the basis in `data`."""
        c = layer.capture
        k = self.rank_for(c.in_features, c.out_features, sum(layer.rows), c.name)
        if k == 0:
            return None
        a, delta = layer.a.to(c.weight.dtype), layer.delta.to(c.weight.dtype)
        target = self.memory.residuals.compensate_product(c.name, delta.T, a) if self.options.error_feedback else None
        op = OuterProduct(delta, a) if target is None else Dense(target)
        data = {"k": k, "op": op, "target": target}
        if self.alternating:
            last = self.memory.starts.get(c.name)
            # a P kept transposed (k x out); when k = in = out the two shapes agree, and then either basis spans
            # the whole space, so taking it for a Q is exact as well
            if last is not None and last.shape == (k, c.out_features) and last.shape != (c.in_features, k):
                p_hat = orthonormalize(last.T.to(c.weight))
                return {**data, "side": "Q", "basis": p_hat}, op.rmm(p_hat)
            q_hat = orthonormalize(self.memory.start(c.name, c.in_features, k, c.weight))
            return {**data, "side": "P", "basis": q_hat}, op.mm(q_hat)
        q = self.memory.start(c.name, c.in_features, k, c.weight)
        return data, op.mm(q)

    def launch(self, layer: LayerStep, comm: Comm) -> Pending:
        """This rank's first factor (`_start`) and its all-reduce started; `finish` waits for it (and, in the
        two-all-reduce form, runs the second half of the step)."""
        started = self._start(layer)
        if started is None:
            return Pending(layer, None)
        data, mine = started
        name = f"{layer.capture.name}/{data.get('side', 'P')}"
        (share,) = self._reduce_all(comm, [mine], [name], keep_mine=self.alternating and self.options.error_feedback)
        return Pending(layer, share, data)

    def launch_all(self, layers: Sequence[LayerStep], comm: Comm) -> list[Pending]:
        """After backward (comm.overlap off): every layer's first factor in ONE all-reduce, in registration
        order."""
        started = {id(layer): self._start(layer) for layer in layers}
        live = self._in_order([la for la in layers if started[id(la)] is not None], lambda la: la)
        sums: dict[int, _Share] = {}
        if live:
            names = [f"{la.capture.name}/{started[id(la)][0].get('side', 'P')}" for la in live]
            keep = self.alternating and self.options.error_feedback
            shares = self._reduce_all(comm, [started[id(la)][1] for la in live], names, keep_mine=keep)
            sums = {id(la): share for la, share in zip(live, shares)}
        return [Pending(la, sums[id(la)], started[id(la)][0]) if id(la) in sums else Pending(la, None) for la in layers]

    def finish(self, pending: Pending, comm: Comm) -> torch.Tensor | None:
        return self.finish_all([pending], comm)[0]

    def finish_all(self, pendings: Sequence[Pending], comm: Comm) -> list[torch.Tensor | None]:
        """The rest of the power step for all the layers at once: each P waited for (they were launched one by
        one, during backward with comm.overlap), orthonormalised, and every layer's Q_i in ONE all-reduce (and,
        with power_iters > 1, every later P too): one round trip for the Q phase, not one per layer."""
        # coalesced in registration order whatever the launch order (overlap launches in reverse): the buffer's
        # layout decides how the ring chunks and sums it, so it must not depend on timing or on comm.overlap
        live = self._in_order([p for p in pendings if p.gather is not None], lambda p: p.layer)
        grads: dict[int, torch.Tensor] = {}
        if live and self.alternating:  # one all-reduce per step: each layer's sum is its decoded gradient's factor
            for p in live:
                grads[id(p)] = self._decoded_alternating(p, p.gather.wait().to(p.layer.capture.weight.dtype), comm)
        elif live:
            p_sums: list[Callable[[], torch.Tensor]] = [p.gather.wait for p in live]
            for iteration in range(self.options.power_iters):
                p_hats = [orthonormalize(s().to(p.layer.capture.weight.dtype)) for s, p in zip(p_sums, live)]
                q_mine = [p.data["op"].rmm(p_hat) for p, p_hat in zip(live, p_hats)]
                q_names = [f"{p.layer.capture.name}/Q" for p in live]
                q_shares = self._reduce_all(comm, q_mine, q_names, keep_mine=self.options.error_feedback)
                qs = [share.wait() for share in q_shares]
                if iteration + 1 < self.options.power_iters:
                    p_next = [p.data["op"].mm(q) for p, q in zip(live, qs)]
                    p_names = [f"{p.layer.capture.name}/P" for p in live]
                    p_sums = [share.wait for share in self._reduce_all(comm, p_next, p_names, False)]
            q_sent = [share.mine() for share in q_shares]
            for p, p_hat, q, sent in zip(live, p_hats, qs, q_sent):
                grads[id(p)] = self._decoded(p, p_hat, q, sent, comm)
        return [grads.get(id(p)) for p in pendings]

    def _decoded(
        self, pending: Pending, p_hat: torch.Tensor, q: torch.Tensor, q_sent: torch.Tensor | None, comm: Comm
    ) -> torch.Tensor:
        """G = P̂ Qᵀ / S for one layer, with its spectrum, warm start and residual bookkeeping."""
        grad = p_hat @ (q / comm.world_size).T
        return self._record(pending, grad, q, (p_hat, q_sent), comm)

    def _decoded_alternating(self, pending: Pending, summed: torch.Tensor, comm: Comm) -> torch.Tensor:
        """A P step's G = P Q̂ᵀ / S or a Q step's G = P̂ Qᵀ / S, from the step's one sum."""
        data = pending.data
        basis, sent, S = data["basis"], pending.gather.mine(), comm.world_size
        if data["side"] == "P":  # kept transposed: the next step sees which side it was
            return self._record(pending, (summed / S) @ basis.T, summed, (sent, basis), comm, start=summed.T)
        return self._record(pending, basis @ (summed / S).T, summed, (basis, sent), comm)

    def _record(
        self,
        pending: Pending,
        grad: torch.Tensor,
        summed: torch.Tensor,
        delivered: tuple[torch.Tensor, torch.Tensor | None],
        comm: Comm,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The bookkeeping of a decoded G, the product of `summed` / S and an orthonormal basis (in either order):
        its spectrum, `start` (default `summed`) as the next warm start, and the residual against this rank's
        delivered share (left @ rightᵀ of `delivered`)."""
        c = pending.layer.capture
        target = pending.data["target"]
        every = self.options.spectrum_every
        if every > 0 and self.memory.step % every == 0 and bool(torch.isfinite(summed).all()):
            # σ of G: the other factor has orthonormal columns
            sigma = torch.linalg.svdvals(summed) / comm.world_size
            self.memory.ranks.observe(c.name, sigma)
            extra = comm.stats.extra
            for j, s in enumerate(sigma.tolist(), start=1):
                extra[metrics.RANKDAD_SIGMA.format(layer=c.name, j=j)] = s
            extra[metrics.RANKDAD_EFF_RANK.format(layer=c.name)] = effective_rank(sigma)

        self.memory.undo.remember(c.name)
        self.memory.undo.decoded(grad)
        if self.memory.ranks.per_layer:  # ranks from a budget: say which this layer used
            comm.stats.extra[metrics.RANKDAD_K.format(layer=c.name)] = pending.data["k"]
        if self.options.warm_start:
            self.memory.starts.put(c.name, summed if start is None else start)
        if target is not None:
            # rank i delivered its own factor as cast for the wire times the basis: the rest of its compensated
            # gradient stays here
            self.memory.residuals.update_factored_(c.name, target, *delivered)
        return grad

    def wire_bytes(self, in_features: int, out_features: int, rows: int, world_size: int, row_bytes: int = 4) -> float:
        # `rows` is the most rows on any rank (the cost-model convention); the total is at least that
        k = self.rank_for(in_features, out_features, rows * world_size)
        return k * self.wire_bytes_per_rank(in_features, out_features, world_size)

    def wire_bytes_per_rank(self, in_features: int, out_features: int, world_size: int) -> float:
        """What one factor column of P and of Q adds to a rank's link per step: 2(S−1)/S × its payload per
        power iteration (alternating: of the larger of P and Q, sent on every other step)."""
        S = world_size
        size = summed_value_bytes(self.options.factor_dtype)
        if self.alternating:  # P (out) or Q (in), one per step: the larger, so that a budget holds at every step
            return 2.0 * (S - 1) / S * max(in_features, out_features) * size
        column = (in_features + out_features) * size
        return 2.0 * (S - 1) / S * self.options.power_iters * column

    def messages(self, world_size: int) -> int:
        """Two ring all-reduces per power iteration, one after the other, of 2(S−1) steps each (alternating: one)."""
        if self.alternating:
            return 2 * (world_size - 1)
        return self.options.power_iters * 2 * 2 * (world_size - 1)

    def rescale_memory(self, ratio: float) -> None:
        self.memory.residuals.rescale_(ratio)

    def end_step(self) -> None:
        """A non-finite step leaves residuals and warm starts untouched (`memory.StepUndo`)."""
        self.memory.end_step()

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)

    def describe(self, captures: Sequence[LinearCapture]) -> dict[str, Any]:
        o = self.options
        return {
            "rank": o.rank,
            "rank_rule": "min(comm.rank, in, out, total rows over ranks)",
            "power_iters": o.power_iters,
            "mode": self.mode,
            "error_feedback": o.error_feedback,
            "warm_start": o.warm_start,
            "factor_dtype": o.factor_dtype,
        }
