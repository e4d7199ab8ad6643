"""`rankdad`: rank-dAD, dAD with the rows of (A, Δ) compressed to k low-rank factors per rank. Lossy.

Per captured Linear, rank i factorises its local gradient M_i = Δ_iᵀ A_i (+ E_i, its error-feedback
residual) as P_i Q_iᵀ with `lowrank.subspace_iteration` (cfg.power_iters steps, warm-started from the
previous step's Q_i when cfg.warm_start, otherwise from a Gaussian seeded by (layer, step), the same on
every rank). k = cfg.rank clipped to min(in, out, max_i N_i), the same on every rank. The factors, cast to
cfg.factor_dtype, travel in one all-gather per layer ([P_i; Q_i], (out+in)×k), and every rank combines
the identical gathered data the same way:

- oneway: G = Σ_i P_i Q_iᵀ / S, rank ≤ S·k (the k factor columns act as dAD pseudo-rows);
- twoway: G = the exact rank-k truncated SVD of that sum, computed from the factors
  (`lowrank.truncate`, O((in+out)(Sk)²)): rank ≤ k, a second approximation error, same bytes.

Bytes per step (payload sent by one rank): 8·2L (counts) + Σ_layers k·(in+out)·bytes(factor_dtype)
+ 4·Σ_rest numel (biases exact: Δᵀ1 is the ordinary bias gradient, all-reduced with the rest).

Error feedback (cfg.error_feedback) keeps E_i = (M_i + E_i) − P̂_i Q̂_iᵀ, P̂/Q̂ as sent (after the dtype cast);
in twoway each rank also adds the recompression error Σ_j P̂_j Q̂_jᵀ/S − G, so the mean of the residuals is
exactly what the delivered gradients have missed. The price: one dense out×in fp32 residual per layer per
rank (memory equal to the weights) and forming M_i densely (N·in·out flops), i.e. the compute dAD saves.
A step whose delivered gradient is not finite leaves residuals and warm-start factors untouched.

Introspection (CommStats.extra, every cfg.spectrum_every steps from step 0): `rankdad/<layer>/sigma<j>`
(j = 1..k) and `rankdad/<layer>/eff_rank` (exp of the entropy of the normalised σ, over all of its up to S·k
singular values) of the delivered gradient, identical on every rank. Periodic because in oneway mode the σ
cost an SVD per layer that the step itself does not need.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .base import CommStats
from .dad import DAD, LayerStep, Launched
from .lowrank import (Dense, OuterProduct, clip_rank, effective_rank, factored_svd, random_start,
                      subspace_iteration, truncate)

FACTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LowRankMemory:
    """Per-layer warm-start factors and error-feedback residuals (the `state_dict` of rank-dAD)."""

    def __init__(self) -> None:
        self.starts: dict[str, torch.Tensor] = {}
        self.residuals: dict[str, torch.Tensor] = {}

    def start(self, name: str, in_features: int, k: int, seed: int, like: torch.Tensor) -> torch.Tensor:
        """Last step's Q if it has the right shape (k can change with the row count), else a seeded start."""
        q = self.starts.get(name)
        if q is not None and q.shape == (in_features, k):
            return q.to(like)
        return random_start(in_features, k, seed, like)

    def residual(self, name: str, like: torch.Tensor) -> torch.Tensor:
        e = self.residuals.get(name)
        return torch.zeros_like(like) if e is None else e.to(like)

    def state_dict(self) -> dict[str, Any]:
        return {"starts": dict(self.starts), "residuals": dict(self.residuals)}

    def load_state_dict(self, state: dict[str, Any], names: set[str]) -> None:
        unknown = (set(state["starts"]) | set(state["residuals"])) - names
        if unknown:
            raise ValueError(f"rankdad: state for unknown layers {sorted(unknown)}")
        self.starts = dict(state["starts"])
        self.residuals = dict(state["residuals"])


class RankDAD(DAD):
    name = "rankdad"
    exact = False

    def __init__(self, cfg, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__(cfg, group)
        self.memory = LowRankMemory()
        self.factor_dtype = FACTOR_DTYPES[cfg.factor_dtype]
        self.step = 0
        self._index: dict[str, int] = {}

    def attach(self, model):
        model = super().attach(model)
        self._index = {c.name: i for i, c in enumerate(self.captures)}
        return model

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(rank=self.cfg.rank, rank_rule="min(comm.rank, in, out, max rows over ranks)",
                    power_iters=self.cfg.power_iters, mode=self.cfg.rankdad_mode,
                    error_feedback=self.cfg.error_feedback, warm_start=self.cfg.warm_start,
                    factor_dtype=self.cfg.factor_dtype)
        clipped = [f"{c.name} ({c.out_features}x{c.in_features})" for c in self.captures
                   if self.cfg.rank >= min(c.in_features, c.out_features)]
        if clipped:
            info["warnings"] = [
                f"comm.rank={self.cfg.rank} is not below min(in, out) of {len(clipped)} layer(s): "
                f"{', '.join(clipped[:6])}{' ...' if len(clipped) > 6 else ''}; they use k=min(in, out), which is "
                "exact at enough power iterations but sends at least as many bytes as all-reduce for that layer "
                "(comm.strategy=auto picks per layer)"]
        return info

    def synchronize(self) -> CommStats:
        stats = super().synchronize()
        self.step += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, **self.memory.state_dict(), **self._rest_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        residual = state.pop("rest_residual", None)
        self.step = int(state["step"])
        self.memory.load_state_dict(state, set(self._index))
        if residual is not None:
            DAD.load_state_dict(self, {"rest_residual": residual})

    # ------------------------------------------------------------------ per layer
    def _launch(self, layer: LayerStep) -> Launched:
        """The local stage (subspace iteration on Δᵀ A, + residual), then the factors' all-gather."""
        c = layer.capture
        k = clip_rank(self.cfg.rank, c.in_features, c.out_features, max(layer.rows))
        if k == 0:
            return Launched(layer, None)
        op = OuterProduct(layer.delta, layer.a)
        target: Optional[torch.Tensor] = None
        if self.cfg.error_feedback:
            residual = self.memory.residuals.get(c.name)
            # Δᵀ A + E in one fused product (no separate dense sum); a fresh tensor, so the stored residual
            # stays untouched until `_finish` replaces it (a non-finite step keeps the old one)
            target = (op.dense() if residual is None
                      else torch.addmm(residual.to(c.weight), layer.delta.T, layer.a))
        # one seed per (layer, step): the same on every rank, a fresh draw every step
        seed = self.step * max(1, len(self._index)) + self._index[c.name]
        start = (self.memory.start(c.name, c.in_features, k, seed, c.weight) if self.cfg.warm_start
                 else random_start(c.in_features, k, seed, c.weight))
        p, q = subspace_iteration(op if target is None else Dense(target), start, self.cfg.power_iters)
        gather = self._gather(torch.cat([p, q]).to(self.factor_dtype), c.name)
        return Launched(layer, gather, {"k": k, "q": q, "target": target})

    def _finish(self, launched: Launched) -> Optional[torch.Tensor]:
        if launched.gather is None:
            return None
        c = launched.layer.capture
        k, q, target = launched.data["k"], launched.data["q"], launched.data["target"]
        parts = launched.gather.wait()
        ps = [t[:c.out_features].to(c.weight.dtype) for t in parts]
        qs = [t[c.out_features:].to(c.weight.dtype) for t in parts]
        p_sum = torch.cat(ps, dim=1).div_(self.comm.world_size)  # out × S·k: Σ_i P_i Q_iᵀ / S = p_sum q_allᵀ
        q_all = torch.cat(qs, dim=1)
        if not bool(torch.isfinite(p_sum).all() and torch.isfinite(q_all).all()):
            # a non-finite step (the trainer's nan_policy skips it) must not poison the memory for good, nor
            # reach an SVD that raises; the gathered factors are the same on every rank, so all decide alike
            return p_sum @ q_all.T
        every = self.cfg.spectrum_every
        log_spectrum = every > 0 and self.step % every == 0
        if self.cfg.rankdad_mode == "oneway":
            grad = p_sum @ q_all.T
            if log_spectrum:
                self._log_spectrum(c.name, factored_svd(p_sum, q_all)[1], k)
        else:
            p_k, q_k, sigma = truncate(p_sum, q_all, k)
            grad = p_k @ q_k.T
            if log_spectrum:
                self._log_spectrum(c.name, sigma, k)

        if self.cfg.warm_start:
            self.memory.starts[c.name] = q
        if target is not None:
            me = self.comm.rank
            # E ← target − P̂ Q̂ᵀ, in place on this step's own target buffer
            residual = target.addmm_(ps[me], qs[me].T, alpha=-1.0)
            if self.cfg.rankdad_mode == "twoway":
                residual.addmm_(p_sum, q_all.T).sub_(grad)
            self.memory.residuals[c.name] = residual
        return grad

    def _log_spectrum(self, name: str, sigma: torch.Tensor, k: int) -> None:
        """σ_1..σ_k, and the effective rank over all of σ (up to S·k values in oneway)."""
        extra = self.comm.stats.extra
        for j, s in enumerate(sigma[:k].tolist(), start=1):
            extra[f"rankdad/{name}/sigma{j}"] = s
        extra[f"rankdad/{name}/eff_rank"] = effective_rank(sigma)
