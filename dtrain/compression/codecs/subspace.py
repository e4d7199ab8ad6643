"""`SubspaceCodec`: rank-dAD's all-reduce form (`comm.rankdad_mode: allreduce`). Lossy.

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

Error feedback (`error_feedback`, `memory.ErrorFeedback`): rank i delivered P̂ Q_iᵀ of its compensated M_i + E_i,
so its residual is M_i + E_i − P̂ Q_iᵀ (exact, since Σ_i P̂ Q_iᵀ / S = G); this needs the dense M_i + E_i, as in the
other forms. Factors travel in `factor_dtype` (bf16/fp16 sums lose precision, as PowerSGD's 16-bit compression
does) and the residual counts what the cast dropped. A step whose decoded gradients are not all finite leaves the
residuals and warm starts as they were (`end_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ... import metrics
from ..capture import LinearCapture
from ..comm import Comm
from ..dtypes import element_size, wire_dtype
from ..lowrank import Dense, OuterProduct, effective_rank, orthonormalize
from .base import LayerCodec, LayerStep, Pending
from .factor_memory import FactorMemory


class SubspaceCodec(LayerCodec):
    name = "rankdad-allreduce"

    def __init__(self, options: Any) -> None:
        self.options = options
        self.factor_dtype = wire_dtype(options.factor_dtype)
        self.memory = FactorMemory(options, prefix="subspace_", codec="rankdad (allreduce mode)")

    def bind(self, layer_names: list[str]) -> None:
        self.memory.bind(layer_names)

    def rank_for(self, in_features: int, out_features: int, rows: int, name: str | None = None) -> int:
        """k for a layer whose ranks hold `rows` rows IN TOTAL (the rank bound of the summed gradient): comm.rank,
        or the layer's rank from a budget."""
        return self.memory.ranks.rank(name, in_features, out_features, rows)

    def _reduce(self, comm: Comm, t: torch.Tensor, name: str, like: torch.Tensor, keep_mine: bool = False):
        """Start the all-reduce of `t` in the wire dtype; `.wait()` gives the sum back. With `keep_mine`, also the
        cast value this rank contributed, in `like`'s dtype (error feedback needs it; otherwise None)."""
        sent = t.to(self.factor_dtype)
        # copied before the launch: the all-reduce overwrites `sent` in place
        mine = sent.to(like.dtype, copy=True) if keep_mine else None
        return comm.all_reduce_async(sent.clone() if sent is t else sent, name), mine

    def launch(self, layer: LayerStep, comm: Comm) -> Pending:
        """P_i = M_i Q, and its all-reduce started (the second half of the step waits for it in `finish`)."""
        c = layer.capture
        k = self.rank_for(c.in_features, c.out_features, sum(layer.rows), c.name)
        if k == 0:
            return Pending(layer, None)
        a, delta = layer.a.to(c.weight.dtype), layer.delta.to(c.weight.dtype)
        target = self.memory.residuals.compensate_product(c.name, delta.T, a) if self.options.error_feedback else None
        op = OuterProduct(delta, a) if target is None else Dense(target)
        q = self.memory.start(c.name, c.in_features, k, c.weight)
        reduce_p, _ = self._reduce(comm, op.mm(q), f"{c.name}/P", c.weight)
        return Pending(layer, reduce_p, {"k": k, "op": op, "target": target})

    def finish(self, pending: Pending, comm: Comm) -> torch.Tensor | None:
        if pending.gather is None:
            return None
        c = pending.layer.capture
        op, target = pending.data["op"], pending.data["target"]
        reduce_p = pending.gather
        for iteration in range(self.options.power_iters):
            p_hat = orthonormalize(reduce_p.wait().to(c.weight.dtype))
            q_mine = op.rmm(p_hat)
            reduce_q, q_sent = self._reduce(comm, q_mine, f"{c.name}/Q", c.weight, keep_mine=target is not None)
            q = reduce_q.wait().to(c.weight.dtype)
            if iteration + 1 < self.options.power_iters:
                reduce_p, _ = self._reduce(comm, op.mm(q), f"{c.name}/P", c.weight)
        grad = p_hat @ (q / comm.world_size).T
        every = self.options.spectrum_every
        if every > 0 and self.memory.step % every == 0 and bool(torch.isfinite(q).all()):
            sigma = torch.linalg.svdvals(q) / comm.world_size  # σ of P̂ Qᵀ/S: P̂ has orthonormal columns
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
            self.memory.starts.put(c.name, q)
        if target is not None:
            # rank i delivered P̂ Q_iᵀ (Q_i as cast for the wire): the rest of its compensated gradient stays here
            self.memory.residuals.update_factored_(c.name, target, p_hat, q_sent)
        return grad

    def wire_bytes(self, in_features: int, out_features: int, rows: int, world_size: int, row_bytes: int = 4) -> float:
        # `rows` is the most rows on any rank (the cost-model convention); the total is at least that
        k = self.rank_for(in_features, out_features, rows * world_size)
        return k * self.wire_bytes_per_rank(in_features, out_features, world_size)

    def wire_bytes_per_rank(self, in_features: int, out_features: int, world_size: int) -> float:
        """What one factor column of P and of Q adds to a rank's link per step: 2(S−1)/S × its payload per
        power iteration."""
        S = world_size
        column = (in_features + out_features) * element_size(self.options.factor_dtype)
        return 2.0 * (S - 1) / S * self.options.power_iters * column

    def messages(self, world_size: int) -> int:
        """Two ring all-reduces per power iteration, one after the other, of 2(S−1) steps each."""
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
            "mode": "allreduce",
            "error_feedback": o.error_feedback,
            "warm_start": o.warm_start,
            "factor_dtype": o.factor_dtype,
        }
