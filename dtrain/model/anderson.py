"""Anderson acceleration (type II, per example) of a fixed-point iteration x ← h(x).

Keeps the last `memory` differences of the values h(x_j) and of the residuals r_j = h(x_j) - x_j, and replaces
the plain next iterate h(x_k) by the combination with the smallest residual in the span of that history:

    γ = argmin ‖r_k - ΔR γ‖²  (ridge-regularised, per example),    x_{k+1} = h(x_k) - ΔH γ

With no history this is the plain iteration. Applied to the damped map h = (1 - α) x + α F(x) it is Anderson
on F with mixing α. On a linear map it is a Krylov method (GMRES-like), so it also converges where the plain
iteration contracts slowly or not at all.

Per example: the least-squares problems never mix examples, so an example's iterates do not depend on which
examples share its batch. `weight` (0 or 1 per entry) removes entries from the least squares: the forward solve
passes its still-active tokens, so frozen tokens neither steer nor are moved by the extrapolation. The history is
kept as it was computed (a token that is active now was active at every earlier iteration, the mask only
shrinks), and the caller decides where the extrapolated value is used.
"""

from __future__ import annotations

from collections import deque

import torch

#: ridge on the normal equations, relative to their mean diagonal: keeps γ bounded once the residual
#: differences become collinear (near convergence, or for an example whose entries are all frozen: γ = 0)
RIDGE = 1e-8


class Anderson:
    def __init__(self, memory: int) -> None:
        self.memory = memory
        self._d_value: deque[torch.Tensor] = deque(maxlen=memory)
        self._d_residual: deque[torch.Tensor] = deque(maxlen=memory)
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def mix(self, value: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The next iterate from value = h(x_k), residual = h(x_k) - x_k [B, ...] and `weight`, broadcastable to
        them, of the entries that count in the least squares. Returns `value` itself without history."""
        if self.memory == 0:
            return value
        if self._previous is not None:
            self._d_value.append(value - self._previous[0])
            self._d_residual.append(residual - self._previous[1])
        self._previous = (value, residual)
        if not self._d_residual:
            return value
        batch = value.shape[0]
        d_res = (
            (torch.stack(list(self._d_residual), dim=1) * weight.unsqueeze(1))
            .reshape(batch, len(self._d_residual), -1)
            .double()
        )
        # the normal equations in float64: in float32 their rounding, amplified by the extrapolation, put dAD's and
        # all-reduce's trainings (equal in exact arithmetic) 1.2e-5 apart (tests/distributed/test_custom_loop.py)
        res = (residual * weight).reshape(batch, -1, 1).double()
        gram = d_res @ d_res.transpose(1, 2)  # [B, m, m]
        ridge = RIDGE * gram.diagonal(dim1=1, dim2=2).mean(dim=1) + torch.finfo(gram.dtype).tiny
        eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram + ridge[:, None, None] * eye, d_res @ res).to(value.dtype)  # [B, m, 1]
        d_value = torch.stack(list(self._d_value), dim=1).reshape(batch, gram.shape[1], -1)
        return value - (gamma * d_value).sum(dim=1).reshape(value.shape)
