"""Implicit-function-theorem gradient of a fixed point, as a tensor hook.

For z* = f(z*, x; θ) and J = ∂f/∂z at z*, the gradient of a loss L through z* is λᵀ ∂f/∂(x, θ) where λ solves
the adjoint fixed point λ = Jᵀ λ + g, g = ∂L/∂z*. The forward pass computes one differentiable step fz = f(z*)
from a constant z*; `attach_adjoint` turns the gradient g arriving at fz into λ before autograd carries it
through that step into x and θ. Nothing from the forward iterations is kept, so memory does not depend on how
many iterations the solve ran.

The adjoint solve. The forward iterates the damped map f(z) = (1 - α) z + α (x + U(z)), so J = (1 - α) I + α K
with K = ∂U/∂z, and λ = Jᵀλ + g is the same equation as (I - Kᵀ) λ = g/α. Its relative residual
‖g - (I - Jᵀ) λ‖ / ‖g‖ is therefore the same whatever the damping; an example stops once it is below `tol`.
The iteration λ ← Jᵀλ + g is Anderson-accelerated per example (anderson.py): on this linear map that is a
Krylov method, so it converges in few iterations where the plain one contracts at no better than 1 - α per
step, and even where K is not a contraction.

Fallback. An example whose adjoint has not reached `tol` after `max_iter` iterations, or whose iterate is not
finite or grew past MAX_GAIN x ‖g‖, gets the 1-step phantom gradient instead (λ = g: the gradient through the
one differentiable step alone, biased but bounded) and is counted, rather than being silently truncated.

The Jᵀλ products come from a second graph, `frozen_step(z)`, built inside the hook from a fresh leaf z and
parameters detached from the model. Re-entering fz's own graph would recurse into this hook, and back-propagating
through the model's projection modules would show a gradient-capturing strategy (dAD) extra passes that are
not parameter gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .anderson import Anderson
from .solver import ExitSchedule

#: an adjoint iterate larger than this many times its ‖g‖ is treated as diverging (for a contraction of spectral
#: radius ρ, ‖λ‖ <= ‖g‖ / (1 - ρ): ρ > 0.99)
MAX_GAIN = 100.0


@dataclass
class AdjointRecord:
    """The last adjoint solve: iterations it needed (the slowest example's; 0 before any backward), the worst
    relative residual over examples before any fallback (nan before any backward), and how many examples fell
    back to the phantom gradient (not converged within max_iter, or diverging).

    The backward leaves these figures on the device (`values`, read on the host only when a field is asked
    for, all three in one sync); `schedule` decides when the adjoint loop reads its exit condition (see
    solver.ExitSchedule) and learns from one backward to the next.
    """

    values: torch.Tensor | None = None  # float64 [3] on the device: iters, residual, fallbacks
    schedule: ExitSchedule = field(default_factory=ExitSchedule)
    _host: tuple[float, float, float] | None = field(default=None, repr=False)

    def set(self, values: torch.Tensor) -> None:
        self.values, self._host = values, None

    def read(self) -> tuple[float, float, float]:
        if self._host is None:
            self._host = (0.0, math.nan, 0.0) if self.values is None else tuple(self.values.tolist())
        return self._host

    @property
    def ran(self) -> bool:
        """Whether a backward has recorded a solve (known without a sync)."""
        return self.values is not None

    @property
    def iters(self) -> int:
        return int(self.read()[0])

    @property
    def residual(self) -> float:
        return self.read()[1]

    @property
    def fallbacks(self) -> int:
        return int(self.read()[2])


def attach_adjoint(
    fz: torch.Tensor,
    frozen_step: Callable[[torch.Tensor], torch.Tensor],
    z_star: torch.Tensor,
    max_iter: int,
    tol: float,
    record: AdjointRecord,
    damping: float = 1.0,
    memory: int = 0,
) -> None:
    """Per example: iterate λ (Anderson with `memory` steps of history; 0: plain) until its relative residual is
    below `tol`, then freeze it; `damping` is the α of `frozen_step`.

    Examples never interact in Jᵀλ (attention stays inside a sequence) nor in the extrapolation, so deciding per
    example makes every example's gradient independent of which other examples share its batch: a global batch
    split over ranks gives the same gradient as one process.

    The host reads whether any example is still active only where `record.schedule` says; an iteration after
    every example stopped changes none of λ, the counters or the residuals (each update is masked by `active`),
    so λ and the record are those of a loop that checks after every iteration.
    """

    # the adjoint re-evaluates the step inside backward, where autocast is off: re-enter the forward's state
    device_type = fz.device.type
    autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

    def solve_adjoint(g: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0]):
            z = z_star.detach().requires_grad_()
            fz_frozen = frozen_step(z)
        per_example = tuple(range(1, g.dim()))
        shape = (-1,) + (1,) * (g.dim() - 1)
        g_norm = g.norm(dim=per_example)
        scale = g_norm.clamp_min(torch.finfo(g.dtype).tiny)
        anderson = Anderson(memory)
        lam = g
        res = torch.full(g.shape[:1], math.inf, dtype=g.dtype, device=g.device)
        active = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
        failed = torch.zeros_like(active)
        example_iters = torch.zeros(g.shape[0], dtype=torch.int64, device=g.device)
        schedule = record.schedule
        schedule.start(max_iter)
        for iteration in range(1, max_iter + 1 if g.shape[0] else min(max_iter, 1) + 1):
            (jt_lam,) = torch.autograd.grad(fz_frozen, z, lam, retain_graph=True)
            example_iters += active
            h_lam = jt_lam + g
            residual = h_lam - lam
            res = torch.where(active, residual.norm(dim=per_example) / scale, res)
            settled = active & (res < tol)
            moving = active & ~settled
            lam_next = anderson.mix(h_lam, residual, moving.to(g.dtype).view(shape))
            blown = moving & ~(lam_next.norm(dim=per_example) <= MAX_GAIN * g_norm)  # also catches NaN/Inf
            moving &= ~blown
            lam = torch.where(moving.view(shape), lam_next, torch.where(settled.view(shape), h_lam, lam))
            failed |= blown
            active &= moving
            if schedule.due(iteration):
                # one read: iteration + 1 while an example is left, else the iterations the slowest needed
                needed = int((example_iters + active).amax())
                if needed <= iteration:
                    schedule.done(needed)
                    break
                schedule.not_done(iteration)
        failed |= active  # not converged within max_iter
        lam = torch.where(failed.view(shape), g, lam)
        if g.shape[0]:
            iters = example_iters.amax().double()
            worst = res.max().double()
        else:  # the loop above ran once (or not at all) and stopped: nothing was active
            iters = torch.full((), float(min(max_iter, 1)), dtype=torch.float64, device=g.device)
            worst = torch.zeros((), dtype=torch.float64, device=g.device)
        record.set(torch.stack([iters, worst, failed.sum().double()]))
        return lam

    fz.register_hook(solve_adjoint)
