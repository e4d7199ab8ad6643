"""The forward solve (solver.solve) on maps with known fixed points: it reaches tol, Anderson needs fewer
iterations than the plain iteration, and a frozen token is never touched again."""

from __future__ import annotations

import torch

from dtrain.model.solver import solve

B, L, D = 3, 5, 4
ALPHA = 0.5


def _coupled_map(rate: float, seed: int = 0):
    """z ↦ (1-α) z + α F(z), F(z) = c + M z with M mixing the tokens of an example (non-normal, eigenvalues
    spread over [0, rate]), so a token's next value depends on the others': a frozen token that were still
    updated would move. Returns the damped step and the exact fixed point of F."""
    gen = torch.Generator().manual_seed(seed)
    n = L * D
    basis = torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(B, n, n, generator=gen, dtype=torch.float64)
    mix = basis @ torch.diag(torch.linspace(0.0, rate, n, dtype=torch.float64)) @ torch.linalg.inv(basis)
    c = torch.randn(B, n, generator=gen, dtype=torch.float64) + 2.0

    def step(z: torch.Tensor) -> torch.Tensor:
        target = c + torch.einsum("bij,bj->bi", mix, z.reshape(B, -1))
        return (1 - ALPHA) * z + ALPHA * target.reshape(z.shape)

    eye = torch.eye(L * D, dtype=torch.float64)
    exact = torch.linalg.solve(eye - mix, c).reshape(B, L, D)
    return step, exact


def _residual(step, z: torch.Tensor) -> torch.Tensor:
    """Per token ||F(z) - z|| / ||z||, the undamped residual the solver tests against tol."""
    return (step(z) - z).norm(dim=-1) / (ALPHA * z.norm(dim=-1))


def test_contractive_map_is_solved_to_tol_by_both_solvers():
    step, exact = _coupled_map(rate=0.6)
    real = torch.ones(B, L, dtype=torch.bool)
    z0 = torch.ones(B, L, D, dtype=torch.float64)
    for memory in (0, 5):
        z, stats = solve(step, z0, real, 1e-8, 200, damping=ALPHA, memory=memory)
        assert bool(stats.converged.all()), memory
        # within a few tol of the fixed point: ‖z - z*‖ ≤ ‖(I - M)⁻¹‖ ‖F(z) - z‖, and ‖(I - M)⁻¹‖ ≈ 2.5 here
        error = (z - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
        assert bool((error < 1e-7).all()), (memory, error)


def test_anderson_needs_far_fewer_iterations_than_the_plain_iteration():
    step, _ = _coupled_map(rate=0.9)
    real = torch.ones(B, L, dtype=torch.bool)
    z0 = torch.ones(B, L, D, dtype=torch.float64)
    _, plain = solve(step, z0, real, 1e-6, 500, damping=ALPHA, memory=0)
    _, anderson = solve(step, z0, real, 1e-6, 500, damping=ALPHA, memory=5)
    assert bool(plain.converged.all()) and bool(anderson.converged.all())
    # the damped plain iteration contracts at ≈ 1 - α + α·0.9 = 0.95 per step: hundreds of iterations
    assert 3 * anderson.iters < plain.iters, (anderson.iters, plain.iters)


def test_a_frozen_token_keeps_its_value_while_the_others_iterate():
    """Token 0 of each example converges at once (F fixes it), the rest later; with padding never moving."""
    step_all, _ = _coupled_map(rate=0.8, seed=1)
    z0 = torch.randn(B, L, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def step(z: torch.Tensor) -> torch.Tensor:  # token 0 is a fixed point of F from the start
        out = step_all(z)
        return torch.cat([z[:, :1], out[:, 1:]], dim=1)

    real = torch.ones(B, L, dtype=torch.bool)
    real[2, 3:] = False  # padding
    for memory in (0, 5):
        z, stats = solve(step, z0, real, 1e-9, 300, damping=ALPHA, memory=memory)
        assert stats.token_iters[:, 0].tolist() == [1, 1, 1], memory
        assert torch.equal(z[:, 0], z0[:, 0]) and torch.equal(z[2, 3:], z0[2, 3:]), memory
        assert int(stats.token_iters[2, 3:].sum()) == 0 and bool(stats.converged[real].all()), memory
        assert bool((_residual(step, z)[real] < 1e-8).all()), memory
