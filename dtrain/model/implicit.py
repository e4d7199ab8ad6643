"""Implicit-function-theorem gradient of a fixed point, as a tensor hook.

For z* = f(z*, x; θ) and J = ∂f/∂z at z*, the gradient of a loss L through z* is λᵀ ∂f/∂(x, θ) where λ solves
the adjoint fixed point λ = Jᵀ λ + g, g = ∂L/∂z*. The forward pass computes one differentiable step fz = f(z*)
from a constant z*; `attach_adjoint` turns the gradient g arriving at fz into λ before autograd carries it
through that step into x and θ. Nothing from the forward iterations is kept, so memory does not depend on how
many iterations the solve ran.

The Jᵀλ products come from a second graph, `frozen_step(z)`, built inside the hook from a fresh leaf z and
parameters detached from the model. Re-entering fz's own graph would recurse into this hook, and back-propagating
through the model's projection modules would show a gradient-capturing strategy (dAD) extra passes that are
not parameter gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


#: an adjoint λ = Σ_k (Jᵀ)^k g of a contraction with spectral radius ρ has |λ| <= |g| / (1 - ρ): beyond this bound
#: (ρ > 0.99) the iteration is treated as diverging
MAX_GAIN = 100.0


@dataclass
class AdjointRecord:
    """The last adjoint solve: iterations run, the worst final relative change of λ over examples (nan before any
    backward), and how many examples were stopped because λ grew past MAX_GAIN times their g."""

    iters: int = 0
    residual: float = math.nan
    diverged: int = 0


def attach_adjoint(fz: torch.Tensor, frozen_step: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor,
                   max_iter: int, tol: float, record: AdjointRecord) -> None:
    """Per example: iterate λ until its relative change is below `tol`, then freeze it.

    Examples never interact in Jᵀλ (attention stays inside a sequence), so deciding per example makes every
    example's gradient independent of which other examples share its batch: a global batch split over ranks
    gives the same gradient as one process. Where the map is not contractive at z* (a forward solve that did
    not converge), the iteration can diverge: an example whose next λ would exceed MAX_GAIN x |g| (or is not
    finite) keeps its last iterate, a truncated Neumann series that stays bounded, and is counted.
    """

    def solve_adjoint(g: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z_star.detach().requires_grad_()
            fz_frozen = frozen_step(z)
        per_example = tuple(range(1, g.dim()))
        shape = (-1,) + (1,) * (g.dim() - 1)
        tiny = torch.finfo(g.dtype).tiny
        bound = MAX_GAIN * g.norm(dim=per_example)
        lam = g
        res = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        active = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
        diverged = torch.zeros_like(active)
        iteration = 0
        for iteration in range(1, max_iter + 1):
            (jt_lam,) = torch.autograd.grad(fz_frozen, z, lam, retain_graph=True)
            lam_next = jt_lam + g
            next_norm = lam_next.norm(dim=per_example)
            blown = active & ~(next_norm <= bound)  # also catches NaN/Inf
            step = active & ~blown
            res = torch.where(step, (lam_next - lam).norm(dim=per_example) / next_norm.clamp_min(tiny), res)
            lam = torch.where(step.view(shape), lam_next, lam)
            diverged |= blown
            active &= ~blown & ~(res < tol)
            if not bool(active.any()):
                break
        record.iters = iteration
        record.residual = float(res.max()) if res.numel() else 0.0
        record.diverged = int(diverged.sum())
        return lam

    fz.register_hook(solve_adjoint)
