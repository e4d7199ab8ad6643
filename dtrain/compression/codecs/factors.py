"""`FactorsCodec`: rank-dAD's codec, dAD with each rank's rows compressed to k low-rank factors. Lossy.

Rank i factorises its local gradient M_i = Δ_iᵀ A_i (+ E_i, its error-feedback residual) as P_i Q_iᵀ with
`lowrank.subspace_iteration` (`power_iters` steps, warm-started from the previous step's Q_i when `warm_start`,
otherwise from a Gaussian seeded by (layer, step), the same on every rank). k = `rank` clipped to
min(in, out, max_i N_i), the same on every rank. The factors, cast to `factor_dtype` (or, for int8 and fp8,
scaled per column: `dtypes.encode_columns`), travel in one all-gather per layer ([P_i; Q_i], (out+in)×k), and
every rank combines the identical gathered data the same way:

- oneway: G = Σ_i P_i Q_iᵀ / S, rank ≤ S·k (the k factor columns act as dAD pseudo-rows);
- twoway: G = the exact rank-k truncated SVD of that sum, computed from the factors
  (`lowrank.truncate`, O((in+out)(Sk)²)): rank ≤ k, a second approximation error, same bytes.

Error feedback (`error_feedback`, `memory.ErrorFeedback`): delivered = P̂_i Q̂_iᵀ as sent (after the dtype cast
or the 8-bit quantisation, which error feedback thus absorbs);
in twoway each rank also counts the recompression error Σ_j P̂_j Q̂_jᵀ/S − G against itself, so the mean of the
residuals is exactly what the delivered gradients have missed. The price: one dense out×in fp32 residual per
layer per rank and forming M_i densely (N·in·out flops), i.e. the compute dAD saves. A step whose decoded
gradients are not all finite leaves residuals and warm-start factors untouched (checked once per step, in
`end_step`).

Introspection (`CommStats.extra`, every `spectrum_every` steps from step 0): `rankdad/<layer>/sigma<j>`
(j = 1..k) and `rankdad/<layer>/eff_rank` of the delivered gradient, identical on every rank. Periodic because in
oneway mode the σ cost an SVD per layer that the step itself does not need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ... import metrics
from ..capture import LinearCapture
from ..comm import Comm
from ..dtypes import QUANTIZED, decode_columns, encode_columns, matrix_bytes, wire_dtype
from ..lowrank import (
    Dense,
    OuterProduct,
    effective_rank,
    factored_svd,
    subspace_iteration,
    truncate,
)
from .base import LayerCodec, LayerStep, Pending
from .factor_memory import FactorMemory


class FactorsCodec(LayerCodec):
    name = "rankdad"

    def __init__(self, options: Any) -> None:
        self.options = options
        # 8-bit factors travel as scaled columns (`dtypes.encode_columns`), the others as a cast
        self.quantized = options.factor_dtype in QUANTIZED
        self.factor_dtype = None if self.quantized else wire_dtype(options.factor_dtype)
        self.memory = FactorMemory(options, prefix="", codec="rankdad")

    def bind(self, layer_names: list[str]) -> None:
        self.memory.bind(layer_names)

    def rank_for(self, in_features: int, out_features: int, rows: int, name: str | None = None) -> int:
        """k for a layer (comm.rank, or the layer's rank from a budget), clipped to min(in, out, rows)."""
        return self.memory.ranks.rank(name, in_features, out_features, rows)

    # ------------------------------------------------------------------ one layer
    def launch(self, layer: LayerStep, comm: Comm) -> Pending:
        """The local stage (subspace iteration on Δᵀ A, + residual), then the factors' all-gather."""
        c = layer.capture
        k = self.rank_for(c.in_features, c.out_features, max(layer.rows), c.name)
        if k == 0:
            return Pending(layer, None)
        # arithmetic in the weight's dtype (QR has no 16-bit kernels; autocast captures 16-bit rows)
        a, delta = layer.a.to(c.weight.dtype), layer.delta.to(c.weight.dtype)
        op = OuterProduct(delta, a)
        # Δᵀ A + E in one fused product, a fresh tensor: the stored residual stays untouched until `finish`
        # replaces it (a non-finite step keeps the old one)
        target = self.memory.residuals.compensate_product(c.name, delta.T, a) if self.options.error_feedback else None
        start = self.memory.start(c.name, c.in_features, k, c.weight)
        p, q = subspace_iteration(op if target is None else Dense(target), start, self.options.power_iters)
        gather = comm.all_gather_async(self._encode(p, q), c.name)
        return Pending(layer, gather, {"k": k, "q": q, "target": target})

    def _encode(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return torch.cat([p, q]).to(self.factor_dtype)
        name = self.options.factor_dtype  # P and Q scaled apart: P's columns are unit, Q's carry the σ
        return torch.cat([encode_columns(p, name), encode_columns(q, name)])

    def _decode(self, part: torch.Tensor, c: LinearCapture, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One rank's gathered (P_i, Q_i), as the values it sent stand for, in the weight's dtype."""
        dtype = c.weight.dtype
        if not self.quantized:
            return part[: c.out_features].to(dtype), part[c.out_features :].to(dtype)
        name = self.options.factor_dtype
        split = matrix_bytes(name, c.out_features, k)
        p = decode_columns(part[:split], name, c.out_features, k)
        return p.to(dtype), decode_columns(part[split:], name, c.in_features, k).to(dtype)

    def finish(self, pending: Pending, comm: Comm) -> torch.Tensor | None:
        if pending.gather is None:
            return None
        c = pending.layer.capture
        k, q, target = pending.data["k"], pending.data["q"], pending.data["target"]
        decoded = [self._decode(t, c, k) for t in pending.gather.wait()]
        ps, qs = [p for p, _ in decoded], [q for _, q in decoded]
        p_sum = torch.cat(ps, dim=1).div_(comm.world_size)  # out × S·k: Σ_i P_i Q_iᵀ / S = p_sum q_allᵀ
        q_all = torch.cat(qs, dim=1)
        every = self.options.spectrum_every
        log_spectrum = every > 0 and self.memory.step % every == 0
        twoway = self.options.rankdad_mode == "twoway"
        if (twoway or log_spectrum) and not bool(torch.isfinite(p_sum).all() and torch.isfinite(q_all).all()):
            # an SVD of non-finite factors raises: decide now (the gathered factors are the same on every rank,
            # so all ranks decide alike); `end_step` leaves the memory as it was
            self.memory.undo.decoded(p_sum)
            return p_sum @ q_all.T
        if not twoway:
            grad = p_sum @ q_all.T
            if log_spectrum:
                self._log_spectrum(comm, c.name, factored_svd(p_sum, q_all)[1], k)
        else:
            p_k, q_k, sigma = truncate(p_sum, q_all, k)
            grad = p_k @ q_k.T
            if log_spectrum:
                self._log_spectrum(comm, c.name, sigma, k)

        self.memory.undo.remember(c.name)
        self.memory.undo.decoded(grad)
        if self.memory.ranks.per_layer:  # ranks from a budget: say which this layer used
            comm.stats.extra[metrics.RANKDAD_K.format(layer=c.name)] = pending.data["k"]
        if self.options.warm_start:
            self.memory.starts.put(c.name, q)
        if target is not None:
            me = comm.rank
            residual = self.memory.residuals.update_factored_(c.name, target, ps[me], qs[me])
            if twoway:
                residual.addmm_(p_sum, q_all.T).sub_(grad)
        return grad

    def _log_spectrum(self, comm: Comm, name: str, sigma: torch.Tensor, k: int) -> None:
        """σ_1..σ_k, and the effective rank over all of σ (up to S·k values in oneway); a budget re-plans from σ."""
        self.memory.ranks.observe(name, sigma)
        extra = comm.stats.extra
        for j, s in enumerate(sigma[:k].tolist(), start=1):
            extra[metrics.RANKDAD_SIGMA.format(layer=name, j=j)] = s
        extra[metrics.RANKDAD_EFF_RANK.format(layer=name)] = effective_rank(sigma)

    def wire_bytes(self, in_features: int, out_features: int, rows: int, world_size: int, row_bytes: int = 4) -> float:
        return self.rank_for(in_features, out_features, rows) * self.wire_bytes_per_rank(
            in_features, out_features, world_size
        )

    def wire_bytes_per_rank(self, in_features: int, out_features: int, world_size: int) -> float:
        """What one factor column of P and of Q adds to a rank's link per step: (S−1) × its payload."""
        name = self.options.factor_dtype
        return float((world_size - 1) * (matrix_bytes(name, out_features, 1) + matrix_bytes(name, in_features, 1)))

    def rescale_memory(self, ratio: float) -> None:
        self.memory.residuals.rescale_(ratio)  # warm starts are directions: subspace iteration ignores their scale

    def end_step(self) -> None:
        """A step whose decoded gradients are not all finite leaves warm starts and residuals as they were
        (`memory.StepUndo`)."""
        self.memory.end_step()

    # ------------------------------------------------------------------ checkpoints, plan.json
    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)

    def describe(self, captures: Sequence[LinearCapture]) -> dict[str, Any]:
        o = self.options
        info: dict[str, Any] = {
            "rank": o.rank,
            "rank_rule": "min(comm.rank, in, out, max rows over ranks)",
            "power_iters": o.power_iters,
            "mode": o.rankdad_mode,
            "error_feedback": o.error_feedback,
            "warm_start": o.warm_start,
            "factor_dtype": o.factor_dtype,
        }
        clipped = [
            f"{c.name} ({c.out_features}x{c.in_features})"
            for c in captures
            if o.rank >= min(c.in_features, c.out_features)
        ]
        if clipped:
            info["warnings"] = [
                f"comm.rank={o.rank} is not below min(in, out) of {len(clipped)} layer(s): "
                f"{', '.join(clipped[:6])}{' ...' if len(clipped) > 6 else ''}; they use k=min(in, out), which is "
                "exact at enough power iterations but sends at least as many bytes as all-reduce for that layer "
                "(comm.strategy=auto picks per layer)"
            ]
        return info
