"""Per-token damped fixed-point iteration with freezing.

Each iteration applies `step` to the whole state, then keeps the new value only for tokens still active. A
token stops (and is frozen at its current value) once its relative change ||z_new - z|| / ||z|| falls below
`tol`; padding tokens are never active. The loop ends when no token is active or after `max_iter` iterations.
Runs the same with grad enabled (the BPTT reference: torch.where passes gradients to the kept values) or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SolveStats:
    token_iters: torch.Tensor  # int64 [B, L] iterations each token was updated in (0 for padding)
    converged: torch.Tensor  # bool [B, L] whether the token stopped on tolerance (False for padding)
    real: torch.Tensor  # bool [B, L] True = real token
    iters: int  # iterations the loop ran

    def example_iters(self) -> torch.Tensor:
        """int64 [B]: iterations until all of the example's real tokens stopped."""
        return self.token_iters.amax(dim=1)

    def mean_token_iters(self) -> float:
        return self.token_iters[self.real].double().mean().item()

    def converged_frac(self) -> float:
        return self.converged[self.real].double().mean().item()


def solve(
    step: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, real: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, SolveStats]:
    """Returns the final state [B, L, D] and how the tokens got there."""
    z = z0
    active = real.clone()
    token_iters = torch.zeros(real.shape, dtype=torch.int64, device=real.device)
    converged = torch.zeros_like(real)
    iters = 0
    while iters < max_iter and bool(active.any()):
        z_new = step(z)
        with torch.no_grad():
            change = (z_new - z).norm(dim=-1) / z.norm(dim=-1).clamp_min(torch.finfo(z.dtype).tiny)
            settled = active & (change < tol)
        z = torch.where(active[..., None], z_new, z)
        token_iters += active
        converged |= settled
        active = active & ~settled  # not in place: torch.where saved the previous mask for backward
        iters += 1
    return z, SolveStats(token_iters=token_iters, converged=converged, real=real, iters=iters)
