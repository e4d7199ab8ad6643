"""PowerSGD's compressor and memory on one process, no process group, float64: what error feedback promises.

`power_iteration_mean` is given a sum function that does nothing (world size 1), so the compressor is tested
without any communicator; the strategy-level tests use `PowerSGD` as the trainer does, at world size 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtrain.compression import build_strategy
from dtrain.compression.memory import ErrorFeedback, TensorMemory
from dtrain.compression.powersgd import MatrixPlan, initial_factor, matrix_plan, power_iteration_mean
from dtrain.config import CommConfig
from tests.helpers.models import ToyEncoder, toy_batch

START = 2
STEPS = 7


def _no_comm(tensor: torch.Tensor, name: str, *, parts) -> torch.Tensor:
    return tensor


def _assert_float64_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float64 rounding of a few additions."""
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14 * max(1.0, b.abs().max().item()))


def _low_rank(n: int, m: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, m, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------------------- the compressor alone
def test_one_cold_step_recovers_a_matrix_of_rank_at_most_r():
    plans = [MatrixPlan("a", 12, 9, 3), MatrixPlan("b", 7, 20, 2)]
    matrices = [_low_rank(12, 9, 3, 0), _low_rank(7, 20, 1, 1)]
    approx, qs = power_iteration_mean(
        matrices, initial_factor(plans, 0, torch.float64), plans, _no_comm, 1, torch.float64
    )
    for a, m in zip(approx, matrices):
        _assert_float64_equal(a, m)
    assert [q.shape for q in qs] == [(9, 3), (20, 2)]


def test_approximation_has_rank_r_and_is_the_projection_onto_p():
    plan = MatrixPlan("a", 10, 8, 2)
    m = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (approx,), _ = power_iteration_mean(
        [m], initial_factor([plan], 5, torch.float64), [plan], _no_comm, 1, torch.float64
    )
    assert torch.linalg.matrix_rank(approx).item() == 2
    # approx = P Pᵀ M for an orthonormal P spanning approx's columns: projecting again changes nothing
    u = torch.linalg.svd(approx).U[:, :2]
    _assert_float64_equal(u @ u.T @ m, approx)
    assert (m - approx).norm() < m.norm()


def test_matrix_plan_follows_torchs_rule():
    assert matrix_plan("v", (24,), 4, 2.0) is None
    assert matrix_plan("w", (24, 16), 4, 2.0) == MatrixPlan("w", 24, 16, 4)  # 40*4*2 = 320 < 384
    assert matrix_plan("w", (5, 16), 4, 2.0) is None  # 21*4*2 = 168 >= 80
    assert matrix_plan("conv", (8, 3, 3, 3), 2, 1.0) == MatrixPlan("conv", 8, 27, 2)
    assert matrix_plan("tiny", (3, 2), 8, 1.0) is None  # rank capped at 2: (3+2)*2 >= 6


# --------------------------------------------------------------------------------------- memory
def test_error_feedback_memory_keeps_what_was_dropped():
    ef = ErrorFeedback()
    g = torch.randn(4, 3, dtype=torch.float64)
    c = ef.compensate("w", g)
    assert torch.equal(c, g) and c.data_ptr() != g.data_ptr()
    delivered = torch.zeros_like(g)
    ef.update("w", c, delivered)
    assert torch.equal(ef.compensate("w", g), 2 * g)


def test_memory_state_dict_round_trips_and_is_a_copy():
    mem = TensorMemory()
    mem.put("q", torch.ones(3))
    state = mem.state_dict()
    state["q"].zero_()
    assert torch.equal(mem.get("q"), torch.ones(3))
    other = TensorMemory()
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.get("q"), torch.ones(3))
    with pytest.raises(ValueError, match="not tensors"):
        other.load_state_dict({"q": [1.0]})


# --------------------------------------------------------------------------------------- the strategy, world size 1
def _run(steps: int, **cfg):
    """PowerSGD on a float64 ToyEncoder, plain SGD; records per step the gradient before and after sync and
    the residuals before and after."""
    torch.manual_seed(0)
    model = ToyEncoder().double()
    strategy = build_strategy(CommConfig(strategy="powersgd", start_step=START, **cfg))
    strategy.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    names = [n for n, _ in model.named_parameters()]
    history = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        tokens, labels = toy_batch(step, 8, 0, 1)
        F.cross_entropy(model(tokens), labels).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        residual_before = {n: strategy.residuals.get(n) for n in names}
        strategy.synchronize()
        history.append(
            {
                "grad": before,
                "delivered": {n: p.grad.clone() for n, p in model.named_parameters()},
                "residual_before": residual_before,
                "residual_after": {n: strategy.residuals.get(n) for n in names},
            }
        )
        opt.step()
    return strategy, history


def test_gradient_plus_residual_is_delivered_plus_new_residual():
    strategy, history = _run(STEPS, rank=1)
    compressed = [plan.name for plan, _ in strategy.compressed]
    assert compressed
    for step, h in enumerate(history[START:], START):
        for n in compressed:
            prev = h["residual_before"][n]
            original = h["grad"][n] + (prev if prev is not None else 0)
            _assert_float64_equal(original, h["delivered"][n] + h["residual_after"][n])
            assert not torch.allclose(h["delivered"][n], original), f"{n} at step {step} was not compressed"


def test_over_many_steps_nothing_is_lost():
    """sum of gradients = sum of delivered gradients + last residual, per compressed tensor."""
    strategy, history = _run(STEPS, rank=1)
    for plan, _ in strategy.compressed:
        n = plan.name
        sent = sum(h["grad"][n] for h in history[START:])
        got = sum(h["delivered"][n] for h in history[START:])
        _assert_float64_equal(sent, got + history[-1]["residual_after"][n])


def test_no_compression_and_no_residual_before_start_step():
    """The first START steps are a plain mean (here of one rank: the gradient, through fp32 buffers)."""
    _, history = _run(START, rank=1)
    for h in history:
        for n, g in h["grad"].items():
            assert torch.equal(h["delivered"][n], g.float().double())
            assert h["residual_after"][n] is None


def test_raw_tensors_keep_no_residual():
    strategy, history = _run(STEPS, rank=1)
    compressed = {plan.name for plan, _ in strategy.compressed}
    raw = [n for n in history[-1]["grad"] if n not in compressed]
    assert raw
    for n in raw:
        assert history[-1]["residual_after"][n] is None
        assert torch.equal(history[-1]["delivered"][n], history[-1]["grad"][n].float().double())


@pytest.mark.parametrize("error_feedback,warm_start", [(False, True), (True, False)])
def test_switches_leave_their_memory_empty(error_feedback, warm_start):
    strategy, _ = _run(START + 2, rank=1, error_feedback=error_feedback, warm_start=warm_start)
    state = strategy.state_dict()
    assert bool(state["residuals"]) == error_feedback
    assert bool(state["factors"]) == warm_start
