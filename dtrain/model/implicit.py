"""Implicit-function-theorem gradient of a fixed point, as a tensor hook.

For z* = f(z*, x; θ) and J = ∂f/∂z at z*, the gradient of a loss L through z* is λᵀ ∂f/∂(x, θ) where λ solves
the adjoint fixed point λ = Jᵀ λ + g, g = ∂L/∂z*. The forward pass computes one differentiable step fz = f(z*)
from a constant z*; `attach_adjoint` turns the gradient g arriving at fz into λ before autograd carries it
through that step into x and θ. Nothing from the forward iterations is kept, so memory does not depend on how
many iterations the solve ran.

Damping. The forward iterates the damped map f(z) = (1 - α) z + α (x + U(z)), so J = (1 - α) I + α K with K = ∂U/∂z,
and λ = Jᵀλ + g is the same equation as λ = Kᵀλ + g/α. Iterated as written, the damped form contracts at no
better than 1 - α per step (0.5 at the default α) even where K itself is small; the undamped form contracts at
the rate of K. So every example starts on the undamped form, λ ← λ + (Jᵀλ + g - λ)/α, and falls back to the
damped one, λ ← Jᵀλ + g, restarted from g, as soon as its change stops shrinking (K not contractive enough, as
when a large negative eigenvalue is tamed only by the damping). Both solve the same equation: only the count
of iterations differs.

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

from .solver import ExitSchedule

#: an adjoint λ = Σ_k (Jᵀ)^k g of a contraction with spectral radius ρ has |λ| <= |g| / (1 - ρ): beyond this bound
#: (ρ > 0.99) the iteration is treated as diverging
MAX_GAIN = 100.0


@dataclass
class AdjointRecord:
    """The last adjoint solve: iterations it needed (the slowest example's; 0 before any backward), the worst
    final relative change of λ over examples (nan before any backward), how many examples were stopped because
    λ grew past MAX_GAIN times their g, and how many fell back to the damped iteration.

    The backward leaves these figures on the device (`values`, read on the host only when a field is asked
    for, all four in one sync); `schedule` decides when the adjoint loop reads its exit condition (see
    solver.ExitSchedule) and learns from one backward to the next.
    """

    values: torch.Tensor | None = None  # float64 [4] on the device: iters, residual, diverged, damped
    schedule: ExitSchedule = field(default_factory=ExitSchedule)
    _host: tuple[float, float, float, float] | None = field(default=None, repr=False)

    def set(self, values: torch.Tensor) -> None:
        self.values, self._host = values, None

    def read(self) -> tuple[float, float, float, float]:
        if self._host is None:
            self._host = (0.0, math.nan, 0.0, 0.0) if self.values is None else tuple(self.values.tolist())
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
    def diverged(self) -> int:
        return int(self.read()[2])

    @property
    def damped(self) -> int:
        return int(self.read()[3])


def attach_adjoint(
    fz: torch.Tensor,
    frozen_step: Callable[[torch.Tensor], torch.Tensor],
    z_star: torch.Tensor,
    max_iter: int,
    tol: float,
    record: AdjointRecord,
    damping: float = 1.0,
) -> None:
    """Per example: iterate λ until its relative change is below `tol`, then freeze it. `damping` is the α of
    `frozen_step` (1.0: undamped, and then there is no fallback to make).

    Examples never interact in Jᵀλ (attention stays inside a sequence), so deciding per example makes every
    example's gradient independent of which other examples share its batch: a global batch split over ranks
    gives the same gradient as one process. Where the map is not contractive at z* (a forward solve that did
    not converge), the iteration can diverge: an example whose next λ would exceed MAX_GAIN x |g| (or is not
    finite) keeps its last iterate, a truncated Neumann series that stays bounded, and is counted.

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
        tiny = torch.finfo(g.dtype).tiny
        bound = MAX_GAIN * g.norm(dim=per_example)
        lam = g
        res = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        active = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
        diverged = torch.zeros_like(active)
        # per example: on the undamped form (over-relaxation by 1/α) until its change stops shrinking
        undamped = torch.full_like(active, damping < 1.0)
        fell_back = torch.zeros_like(active)
        change = torch.full(res.shape, math.inf, dtype=g.dtype, device=g.device)
        example_iters = torch.zeros(g.shape[0], dtype=torch.int64, device=g.device)
        schedule = record.schedule
        schedule.start(max_iter)
        for iteration in range(1, max_iter + 1 if g.shape[0] else min(max_iter, 1) + 1):
            (jt_lam,) = torch.autograd.grad(fz_frozen, z, lam, retain_graph=True)
            example_iters += active
            damped_next = jt_lam + g
            relax = torch.where(undamped, 1.0 / damping, 1.0).to(g.dtype).view(shape)
            lam_next = lam + relax * (damped_next - lam)
            next_norm = lam_next.norm(dim=per_example)
            step_change = (lam_next - lam).norm(dim=per_example)
            # an undamped example whose change grew, or that blew up, restarts from g on the damped form
            drop = active & undamped & (~(next_norm <= bound) | ~(step_change < change))
            undamped &= ~drop
            fell_back |= drop
            lam = torch.where(drop.view(shape), g, lam)
            change = torch.where(drop, math.inf, step_change)
            blown = active & ~drop & ~(next_norm <= bound)  # also catches NaN/Inf
            step = active & ~drop & ~blown
            res = torch.where(step, step_change / next_norm.clamp_min(tiny), res)
            lam = torch.where(step.view(shape), lam_next, lam)
            diverged |= blown
            active &= ~blown & ~(step & (res < tol))
            if schedule.due(iteration):
                # one read: iteration + 1 while an example is left, else the iterations the slowest needed
                needed = int((example_iters + active).amax())
                if needed <= iteration:
                    schedule.done(needed)
                    break
                schedule.not_done(iteration)
        if g.shape[0]:
            iters = example_iters.amax().double()
            worst = res.max().double()
        else:  # the loop above ran once (or not at all) and stopped: nothing was active
            iters = torch.full((), float(min(max_iter, 1)), dtype=torch.float64, device=g.device)
            worst = torch.zeros((), dtype=torch.float64, device=g.device)
        record.set(torch.stack([iters, worst, diverged.sum().double(), fell_back.sum().double()]))
        return lam

    fz.register_hook(solve_adjoint)
