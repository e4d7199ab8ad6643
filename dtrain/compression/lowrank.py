"""Low-rank factoring of a weight gradient that is given as an outer product (the rank-dAD compressor).

A Linear layer's local weight gradient is M = Δᵀ A (Δ: rows×out, A: rows×in). `OuterProduct` applies M
and Mᵀ to thin matrices as Δᵀ(A v) and Aᵀ(Δ u), at O(rows·(in+out)·k) each, so the out×in matrix is
never formed. `subspace_iteration` is a blocked power iteration with QR orthonormalisation and a
caller-supplied start (warm start or a seeded random matrix): M ≈ P Qᵀ with P (out×k) orthonormal and
Q = Mᵀ P (in×k), i.e. P Qᵀ = P Pᵀ M is M projected onto span(P). It converges to the rank-k truncated SVD.

Everything here is a pure function of its arguments (no process group, no state), deterministic for
identical inputs: ranks that start from the same seed and data get bitwise the same factors.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class LinearOperator(Protocol):
    """An out×in matrix known only through products with thin matrices."""

    def mm(self, v: torch.Tensor) -> torch.Tensor:
        """M v for v of shape (in, k)."""

    def rmm(self, u: torch.Tensor) -> torch.Tensor:
        """Mᵀ u for u of shape (out, k)."""


def thin_product(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """m @ v for a thin v (a few columns), computed as (vᵀ mᵀ)ᵀ: the same product, which the CPU's BLAS runs 3 to
    9 times faster with the thin operand on the left (torch 2.13 CPU, k = 4, 256 to 1024 wide;
    docs/benchmarks.md). Transposes are views, so on a GPU this costs nothing either way."""
    return (v.T @ m.T).T.contiguous()


class OuterProduct:
    """M = Δᵀ A, applied through its factors."""

    def __init__(self, delta: torch.Tensor, a: torch.Tensor) -> None:
        if delta.shape[0] != a.shape[0]:
            raise ValueError(f"Δ has {delta.shape[0]} rows but A has {a.shape[0]}")
        self.delta = delta
        self.a = a

    def mm(self, v: torch.Tensor) -> torch.Tensor:
        return thin_product(self.delta.T, thin_product(self.a, v))

    def rmm(self, u: torch.Tensor) -> torch.Tensor:
        return thin_product(self.a.T, thin_product(self.delta, u))

    def dense(self) -> torch.Tensor:
        """The out×in matrix itself: only for error feedback, whose residual is dense anyway."""
        return self.delta.T @ self.a


class Dense:
    """An explicit out×in matrix (gradient plus error-feedback residual)."""

    def __init__(self, m: torch.Tensor) -> None:
        self.m = m

    def mm(self, v: torch.Tensor) -> torch.Tensor:
        return thin_product(self.m, v)

    def rmm(self, u: torch.Tensor) -> torch.Tensor:
        return thin_product(self.m.T, u)


def clip_rank(k: int, in_features: int, out_features: int, rows: int) -> int:
    """Rank actually used for a layer: a gradient of `rows` outer products has rank ≤ min(in, out, rows)."""
    return max(0, min(k, in_features, out_features, rows))


def random_start(in_features: int, k: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A seeded Gaussian in×k start, identical on every rank for the same seed and device type."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn((in_features, k), generator=gen, device=like.device, dtype=like.dtype)


def orthonormalize(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of m (tall, thin) by Householder QR: no NaN on rank deficiency."""
    return torch.linalg.qr(m, mode="reduced").Q


def subspace_iteration(op: LinearOperator, start: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`iters` steps of P ← orth(M Q), Q ← Mᵀ P from Q = `start` (in×k). Returns (P, Q), M ≈ P Qᵀ."""
    if iters < 1:
        raise ValueError(f"iters must be ≥ 1, got {iters}")
    q = start
    for _ in range(iters):
        p = orthonormalize(op.mm(q))
        q = op.rmm(p)
    return p, q


def factored_svd(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD U diag(σ) Vᵀ of P Qᵀ (P: out×r, Q: in×r) in O((in+out)·r²), without forming P Qᵀ."""
    qp, rp = torch.linalg.qr(p, mode="reduced")
    qq, rq = torch.linalg.qr(q, mode="reduced")
    u, sigma, vh = torch.linalg.svd(rp @ rq.T)
    return qp @ u, sigma, qq @ vh.T


def truncate(p: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact rank-k truncated SVD of P Qᵀ as factors (P_k orthonormal, Q_k = V_k diag(σ_k)), and σ_k."""
    u, sigma, v = factored_svd(p, q)
    return u[:, :k], v[:, :k] * sigma[:k], sigma[:k]


def singular_values(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """σ of P Qᵀ when P has orthonormal columns (as `subspace_iteration` returns): the σ of Q."""
    return torch.linalg.svdvals(q)


def effective_rank(sigma: torch.Tensor) -> float:
    """exp of the Shannon entropy of σ/Σσ (Roy & Vetterli 2007): k for k equal values, 1 for one."""
    total = float(sigma.sum())
    if total <= 0.0 or not math.isfinite(total):
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))
