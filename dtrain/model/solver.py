"""Per-token fixed-point solve with freezing (plain or Anderson-accelerated), and when the host looks at the
loop-exit condition.

Each iteration applies `step` (the damped map f(z) = (1 - α) z + α F(z)) to the whole state and measures each
token's fixed-point residual ||F(z) - z|| / ||z|| = ||f(z) - z|| / (α ||z||): the residual of the undamped map,
so `tol` means the same whatever the damping (a damped step changes z by only α times it). A token whose residual
is below `tol` takes the plain step f(z) once more and is then frozen; padding tokens are never active. Tokens
still active take the next iterate: f(z) itself with `memory` 0, else the Anderson extrapolation (anderson.py)
over the last `memory` steps of their example, computed on the active tokens only. The loop ends when no token
is active or after `max_iter` iterations. Runs the same with grad enabled (the BPTT reference: torch.where passes
gradients to the kept values, and the extrapolation is differentiable) or not.

Host syncs. Whether any token is still active is a device value; reading it on the host (`bool(active.any())`)
waits for the device to finish everything queued so far. The loop therefore reads it only at the iterations an
`ExitSchedule` picks, and keeps iterating blindly in between. An iteration run after the last token stopped
changes nothing: every token is frozen (`torch.where` keeps z bitwise, the counters add 0), so the state, the
counters and hence the results are exactly those of a loop that checks after every iteration, whatever the
schedule. Only the work spent on such no-op iterations, and the number of syncs, depend on it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .anderson import Anderson

#: where a fresh ExitSchedule first looks: the iterations a solve is guessed to need before anything is known
FIRST_CHECK = 4
#: how many past solves the first check is planned from (it goes at the fewest iterations any of them needed)
HISTORY = 8


class ExitSchedule:
    """At which iterations a loop reads its exit condition on the host; it learns from the loops it scheduled.

    A loop of at most `max_iter` iterations first checks after `hint` iterations: the fewest that any of the
    last HISTORY loops needed (FIRST_CHECK before any). Then it checks after gaps of 1, 2, 4, ... iterations,
    never later than iteration `max_iter - 1` (at `max_iter` the loop ends without looking). A check that finds
    the loop done also reads how many iterations it really needed. So a loop whose count repeats costs one sync
    and wastes no iteration, a loop that runs to `max_iter` costs one sync (at `max_iter - 1`), and a count d
    above the hint costs 1 + log2(d) syncs and wastes fewer iterations than the last gap. Planning from the
    fewest rather than the last count wastes nothing when the count wobbles: an iteration costs far more than
    a sync.
    """

    def __init__(self, hint: int = FIRST_CHECK) -> None:
        self.first = max(1, int(hint))  # the hint until a loop has been seen
        self.recent: deque[int] = deque(maxlen=HISTORY)  # iterations the last loops needed
        self.syncs = 0  # exit-condition reads so far (over all loops run with this schedule)
        self._next = 0
        self._gap = 1
        self._last = 0

    @property
    def hint(self) -> int:
        return min(self.recent) if self.recent else self.first

    def start(self, max_iter: int) -> None:
        self._last = max_iter - 1  # the latest iteration worth a check
        self._next = min(self.hint, self._last)
        self._gap = 1

    def due(self, iteration: int) -> bool:
        """Whether to read the exit condition after `iteration` (1-based) iterations."""
        return 0 < iteration == self._next

    def not_done(self, iteration: int) -> None:
        """The check after `iteration` found work left."""
        self.syncs += 1
        if iteration >= self._last:  # work left for the last iteration: this loop needs all max_iter
            self.recent.append(self._last + 1)
            self._next = 0
            return
        self._next = min(iteration + self._gap, self._last)
        self._gap *= 2

    def done(self, needed: int) -> None:
        """A check found the loop done; `needed` is how many iterations it really took."""
        self.syncs += 1
        self.recent.append(max(1, needed))


@dataclass
class SolveStats:
    token_iters: torch.Tensor  # int64 [B, L] iterations each token was updated in (0 for padding)
    converged: torch.Tensor  # bool [B, L] whether the token stopped on tolerance (False for padding)
    real: torch.Tensor  # bool [B, L] True = real token
    known_iters: int | None = None  # the loop's needed iterations when the host already read them, else None

    @property
    def iters(self) -> int:
        """Iterations the loop needed: until its slowest real token stopped, or max_iter (0 without real
        tokens). Not the no-op iterations the loop may have run after that. May sync (once) to read."""
        if self.known_iters is None:
            self.known_iters = int(self.loop_iters()) if self.token_iters.numel() else 0
        return self.known_iters

    def loop_iters(self) -> torch.Tensor:
        """int64 scalar on the device: `iters` without reading it."""
        if self.known_iters is not None or not self.token_iters.numel():
            return torch.full((), self.iters, dtype=torch.int64, device=self.token_iters.device)
        return self.token_iters.amax()

    def example_iters(self) -> torch.Tensor:
        """int64 [B]: iterations until all of the example's real tokens stopped."""
        return self.token_iters.amax(dim=1)

    def device_sums(self) -> torch.Tensor:
        """float64 [3] on the device: total token iterations, converged tokens and real tokens (all integers,
        exact in float64): the two means below, read together with other figures in one sync."""
        # token_iters is 0 and converged False on padding
        return torch.stack([self.token_iters.sum().double(), self.converged.sum().double(), self.real.sum().double()])

    def mean_token_iters(self) -> float:
        iters, _, count = self.device_sums().tolist()
        return iters / count if count else float("nan")

    def converged_frac(self) -> float:
        _, converged, count = self.device_sums().tolist()
        return converged / count if count else float("nan")


def solve(
    step: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    real: torch.Tensor,
    tol: float,
    max_iter: int,
    schedule: ExitSchedule | None = None,
    damping: float = 1.0,
    memory: int = 0,
) -> tuple[torch.Tensor, SolveStats]:
    """Returns the final state [B, L, D] and how the tokens got there. `damping`: the α of `step`; `memory`: the
    Anderson history (0: the plain iteration). `schedule` (kept by the caller between solves, so that it learns
    the usual count) decides when the host reads the exit condition."""
    schedule = ExitSchedule() if schedule is None else schedule
    anderson = Anderson(memory)
    z = z0
    active = real.clone()
    token_iters = torch.zeros(real.shape, dtype=torch.int64, device=real.device)
    converged = torch.zeros_like(real)
    if not real.numel():  # no token at all: the loop has nothing to do
        return z, SolveStats(token_iters=token_iters, converged=converged, real=real, known_iters=0)
    known: int | None = None
    schedule.start(max_iter)
    for iteration in range(1, max_iter + 1):
        fz = step(z)
        with torch.no_grad():
            residual = (fz - z).norm(dim=-1) / (damping * z.norm(dim=-1).clamp_min(torch.finfo(z.dtype).tiny))
            settled = active & (residual < tol)
            moving = active & ~settled
        z_next = anderson.mix(fz, fz - z, moving[..., None].to(z.dtype))
        z = torch.where(moving[..., None], z_next, torch.where(settled[..., None], fz, z))
        token_iters += active
        converged |= settled
        active = active & ~settled  # not in place: torch.where saved the previous mask for backward
        if schedule.due(iteration):
            # one read: iteration + 1 while a token is left, else the iterations the slowest token needed
            needed = int((token_iters + active).amax())
            if needed <= iteration:
                schedule.done(needed)
                known = needed
                break
            schedule.not_done(iteration)
            if iteration == max_iter - 1:
                known = max_iter  # a token was still active for the last iteration
    return z, SolveStats(token_iters=token_iters, converged=converged, real=real, known_iters=known)
