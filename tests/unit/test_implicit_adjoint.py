"""The adjoint solve on linear maps with known answers: undamped by default, damped where it must be, per example."""

from __future__ import annotations

import torch

from dtrain.model.implicit import AdjointRecord, attach_adjoint

ALPHA = 0.5
N = 6


def _matrix(eigenvalues: list[float], seed: int) -> torch.Tensor:
    """A non-symmetric matrix with the given real eigenvalues (similarity transform of a diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.eye(N, dtype=torch.float64) + 0.3 * torch.randn(N, N, generator=gen, dtype=torch.float64)
    return basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ torch.linalg.inv(basis)


def _solve(
    ks: list[torch.Tensor], g: torch.Tensor, damping: float = ALPHA, max_iter: int = 200
) -> tuple[torch.Tensor, AdjointRecord]:
    """λ for the damped map z ↦ (1-α) z + α (K_b z + c), one K per example b, through attach_adjoint."""
    k = torch.stack(ks)

    def step(z: torch.Tensor) -> torch.Tensor:
        return (1 - damping) * z + damping * (torch.einsum("bij,bj->bi", k, z) + 1.0)

    z_star = torch.zeros(len(ks), N, dtype=torch.float64)
    z = z_star.clone().requires_grad_()
    fz = step(z)
    record, seen = AdjointRecord(), {}
    attach_adjoint(fz, step, z_star, max_iter, 1e-13, record, damping=damping)
    fz.register_hook(lambda lam: seen.setdefault("lam", lam.detach().clone()))
    fz.backward(g)
    return seen["lam"], record


def _exact(ks: list[torch.Tensor], g: torch.Tensor, damping: float = ALPHA) -> torch.Tensor:
    eye = torch.eye(N, dtype=torch.float64)
    return torch.stack([torch.linalg.solve(eye - ((1 - damping) * eye + damping * k).T, gb) for k, gb in zip(ks, g)])


def test_contractive_map_is_solved_undamped_in_fewer_iterations():
    ks = [_matrix([0.2, -0.15, 0.1, 0.05, 0.0, -0.1], seed=0)]
    g = torch.randn(1, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lam, record = _solve(ks, g)
    torch.testing.assert_close(lam, _exact(ks, g), rtol=1e-11, atol=0)
    assert record.damped == 0 and record.diverged == 0
    # the damped form contracts at 1 - α + α·0.2 = 0.6 per step (≈ 60 steps to 1e-13); K alone at 0.2 (≈ 20)
    assert record.iters <= 25, record


def test_map_contractive_only_when_damped_falls_back_and_still_solves_exactly():
    ks = [_matrix([-1.6, 0.3, 0.2, -0.2, 0.1, 0.0], seed=2)]  # undamped diverges; damped: |0.5 - 0.8| = 0.3
    g = torch.randn(1, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lam, record = _solve(ks, g)
    torch.testing.assert_close(lam, _exact(ks, g), rtol=1e-11, atol=0)
    assert record.damped == 1 and record.diverged == 0


def test_each_example_is_solved_as_if_alone():
    """The fallback is decided per example: a batch mixing both kinds gives each example its solo answer."""
    easy, hard = _matrix([0.2, 0.1, 0.0, -0.1, 0.05, 0.1], seed=4), _matrix([-1.6, 0.3, 0.2, -0.2, 0.1, 0.0], seed=5)
    g = torch.randn(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    together, record = _solve([easy, hard], g)
    alone = torch.cat([_solve([easy], g[:1])[0], _solve([hard], g[1:])[0]])
    assert torch.equal(together, alone)
    assert record.damped == 1


def test_undamped_step_has_nothing_to_fall_back_to():
    ks = [_matrix([0.3, 0.2, 0.1, 0.0, -0.1, -0.2], seed=7)]
    g = torch.randn(1, N, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    lam, record = _solve(ks, g, damping=1.0)
    torch.testing.assert_close(lam, _exact(ks, g, damping=1.0), rtol=1e-11, atol=0)
    assert record.damped == 0
