"""The adjoint solve on linear maps with known answers (a dense-Jacobian oracle): solved to adj_tol, faster with
Anderson than plain, per example, and a counted fallback to the phantom gradient where it does not converge."""

from __future__ import annotations

import torch

from dtrain.model.implicit import AdjointRecord, attach_adjoint

ALPHA = 0.5
N = 6
TOL = 1e-10


def _matrix(eigenvalues: list[float], seed: int) -> torch.Tensor:
    """A non-symmetric matrix with the given real eigenvalues (similarity transform of a diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.eye(N, dtype=torch.float64) + 0.3 * torch.randn(N, N, generator=gen, dtype=torch.float64)
    return basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ torch.linalg.inv(basis)


def _solve(
    ks: list[torch.Tensor], g: torch.Tensor, memory: int = 5, max_iter: int = 200
) -> tuple[torch.Tensor, AdjointRecord]:
    """λ for the damped map z ↦ (1-α) z + α (K_b z + c), one K per example b, through attach_adjoint."""
    k = torch.stack(ks)

    def step(z: torch.Tensor) -> torch.Tensor:
        return (1 - ALPHA) * z + ALPHA * (torch.einsum("bij,bj->bi", k, z) + 1.0)

    z_star = torch.zeros(len(ks), N, dtype=torch.float64)
    z = z_star.clone().requires_grad_()
    fz = step(z)
    record, seen = AdjointRecord(), {}
    attach_adjoint(fz, step, z_star, max_iter, TOL, record, damping=ALPHA, memory=memory)
    fz.register_hook(lambda lam: seen.setdefault("lam", lam.detach().clone()))
    fz.backward(g)
    return seen["lam"], record


def _jacobian(ks: list[torch.Tensor]) -> torch.Tensor:
    eye = torch.eye(N, dtype=torch.float64)
    return torch.stack([(1 - ALPHA) * eye + ALPHA * k for k in ks])


def _relative_residual(ks: list[torch.Tensor], g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """‖g - (I - Jᵀ) λ‖ / ‖g‖ per example, J the dense Jacobian of the damped map."""
    jt_lam = torch.einsum("bji,bj->bi", _jacobian(ks), lam)
    return (g - lam + jt_lam).norm(dim=1) / g.norm(dim=1)


def _exact(ks: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(N, dtype=torch.float64)
    return torch.stack([torch.linalg.solve(eye - j.T, gb) for j, gb in zip(_jacobian(ks), g)])


def _g(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, N, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_the_adjoint_is_solved_to_adj_tol_against_the_dense_oracle():
    ks = [_matrix([0.6, -0.5, 0.4, 0.3, 0.0, -0.2], seed=0), _matrix([-1.6, 0.3, 0.2, -0.2, 0.1, 0.0], seed=2)]
    g = _g(2, seed=1)
    lam, record = _solve(ks, g)
    # one more plain step after the residual met TOL: the returned λ is at least that good
    assert bool((_relative_residual(ks, g, lam) < TOL).all())
    torch.testing.assert_close(lam, _exact(ks, g), rtol=1e-8, atol=0)
    assert record.fallbacks == 0 and record.residual < TOL


def test_anderson_solves_the_adjoint_in_fewer_iterations_than_the_plain_iteration():
    ks = [_matrix([0.9, 0.8, 0.5, 0.3, -0.4, 0.1], seed=3)]  # damped plain rate 1 - α + α·0.9 = 0.95
    g = _g(1, seed=4)
    lam_plain, plain = _solve(ks, g, memory=0, max_iter=1000)
    lam_anderson, anderson = _solve(ks, g, memory=5)
    for lam in (lam_plain, lam_anderson):
        torch.testing.assert_close(lam, _exact(ks, g), rtol=1e-7, atol=0)
    # plain: ≈ log(1e-10) / log(0.95) ≈ 450 iterations; Anderson (a windowed Krylov method here): a few N
    assert 20 * anderson.iters < plain.iters, (anderson.iters, plain.iters)


def test_each_example_is_solved_as_if_alone():
    easy, hard = _matrix([0.2, 0.1, 0.0, -0.1, 0.05, 0.1], seed=4), _matrix([-1.6, 0.3, 0.2, -0.2, 0.1, 0.0], seed=5)
    g = _g(2, seed=6)
    together, _ = _solve([easy, hard], g)
    alone = torch.cat([_solve([easy], g[:1])[0], _solve([hard], g[1:])[0]])
    assert torch.equal(together, alone)


def test_an_adjoint_that_does_not_converge_falls_back_to_the_phantom_gradient_and_is_counted():
    """Too few iterations for the slow example, a singular system for another: both get λ = g, counted."""
    fine = _matrix([0.2, 0.1, 0.0, -0.1, 0.05, 0.1], seed=7)
    slow = _matrix([0.9, 0.8, 0.7, 0.6, -0.5, 0.4], seed=8)
    singular = _matrix([1.0, 0.5, 0.2, 0.0, -0.3, 0.1], seed=9)  # I - Jᵀ is singular: no solution, λ grows
    g = _g(3, seed=10)
    lam, record = _solve([fine, slow, singular], g, memory=0, max_iter=60)
    assert record.fallbacks == 2 and record.residual > TOL
    assert torch.equal(lam[1:], g[1:])
    torch.testing.assert_close(lam[:1], _exact([fine], g[:1]), rtol=1e-8, atol=0)
