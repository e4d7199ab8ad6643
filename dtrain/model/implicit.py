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


@dataclass
class AdjointRecord:
    """The last adjoint solve: iterations run and the final relative change of λ (nan before any backward)."""

    iters: int = 0
    residual: float = math.nan


def attach_adjoint(fz: torch.Tensor, frozen_step: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor,
                   max_iter: int, tol: float, record: AdjointRecord) -> None:
    def solve_adjoint(g: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z_star.detach().requires_grad_()
            fz_frozen = frozen_step(z)
        lam = g
        for iteration in range(1, max_iter + 1):
            (jt_lam,) = torch.autograd.grad(fz_frozen, z, lam, retain_graph=True)
            lam_next = jt_lam + g
            residual = ((lam_next - lam).norm() / lam_next.norm().clamp_min(torch.finfo(g.dtype).tiny)).item()
            lam = lam_next
            if residual < tol:
                break
        record.iters, record.residual = iteration, residual
        return lam

    fz.register_hook(solve_adjoint)
