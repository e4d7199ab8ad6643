"""The rank-dAD compressor (dtrain/compression/lowrank.py) and its memory, without a process group."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dtrain.compression import build_strategy
from dtrain.compression.lowrank import (
    Dense,
    OuterProduct,
    clip_rank,
    effective_rank,
    random_start,
    singular_values,
    subspace_iteration,
    truncate,
)
from dtrain.config import CommConfig
from tests.helpers.models import ToyEncoder, toy_batch
from tests.helpers.probes import LargestTensor


def _known_spectrum(out: int, inp: int, sigma: torch.Tensor, seed: int = 0):
    """(Δ, A) with Δᵀ A = U diag(σ) Vᵀ for random orthonormal U, V: the SVD is known without computing one."""
    g = torch.Generator().manual_seed(seed)
    r = sigma.numel()
    u = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64)).Q
    return (u * sigma).T.contiguous(), v.T.contiguous(), u, v


def test_subspace_iteration_converges_to_truncated_svd():
    sigma = 2.0 ** -torch.arange(10, dtype=torch.float64)  # gap σ_{k+1}/σ_k = 1/2
    delta, a, u, v = _known_spectrum(30, 20, sigma)
    k = 4
    best = (u[:, :k] * sigma[:k]) @ v[:, :k].T
    errors = []
    for iters in (1, 3, 30):
        p, q = subspace_iteration(OuterProduct(delta, a), random_start(20, k, seed=1, like=a), iters)
        errors.append(float((p @ q.T - best).norm() / best.norm()))
    print("distance to the rank-4 truncated SVD after 1, 3, 30 iterations:", errors)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-12
    torch.testing.assert_close(singular_values(p, q), sigma[:k], rtol=1e-12, atol=0)


def test_one_iteration_is_exact_when_k_covers_the_rank():
    g = torch.Generator().manual_seed(2)
    delta, a = torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    p, q = subspace_iteration(OuterProduct(delta, a), random_start(9, 5, seed=3, like=a), iters=1)
    torch.testing.assert_close(p @ q.T, delta.T @ a, rtol=1e-12, atol=1e-12)


def test_random_start_is_a_function_of_the_seed():
    like = torch.empty(0)
    assert torch.equal(random_start(7, 3, seed=5, like=like), random_start(7, 3, seed=5, like=like))
    assert not torch.equal(random_start(7, 3, seed=5, like=like), random_start(7, 3, seed=6, like=like))


def test_truncate_is_the_truncated_svd_of_the_product():
    g = torch.Generator().manual_seed(4)
    p, q = torch.randn(11, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(p @ q.T)
    p3, q3, s3 = truncate(p, q, 3)
    torch.testing.assert_close(p3 @ q3.T, (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s3, s[:3], rtol=1e-12, atol=0)


def test_clip_rank_and_effective_rank():
    assert clip_rank(8, in_features=16, out_features=5, rows=100) == 5
    assert clip_rank(8, in_features=16, out_features=24, rows=3) == 3
    assert clip_rank(8, in_features=16, out_features=24, rows=0) == 0
    assert abs(effective_rank(torch.ones(4)) - 4.0) < 1e-6
    assert abs(effective_rank(torch.tensor([3.0, 0.0, 0.0])) - 1.0) < 1e-6
    assert 1.0 < effective_rank(torch.tensor([1.0, 0.5, 0.25])) < 3.0


def test_factored_iteration_never_forms_the_out_by_in_matrix():
    out, inp, rows, k = 64, 48, 6, 3
    g = torch.Generator().manual_seed(5)
    delta, a = torch.randn(rows, out, generator=g), torch.randn(rows, inp, generator=g)
    start = random_start(inp, k, seed=0, like=a)
    with LargestTensor() as factored:
        subspace_iteration(OuterProduct(delta, a), start, iters=4)
    with LargestTensor() as dense:  # the control: the detector does see an out×in product
        subspace_iteration(Dense(OuterProduct(delta, a).dense()), start, iters=4)
    assert factored.largest < out * inp, factored.largest
    assert dense.largest >= out * inp


def test_error_feedback_invariant_in_float64():
    """(G + E_prev) = P̂ Q̂ᵀ + E_new for the factors as SENT: fp16 factors make an off-by-the-cast residual fail."""
    torch.manual_seed(0)
    model = ToyEncoder().double()
    plain = ToyEncoder().double()  # uncaptured twin: ordinary autograd gives the local gradient G
    plain.load_state_dict(model.state_dict())
    strategy = build_strategy(CommConfig(strategy="rankdad", rank=2, power_iters=2, factor_dtype="fp16"))
    strategy.attach(model)
    names = [c.name for c in strategy.captures]
    (codec,) = strategy.plan.codecs()
    for step in range(3):  # no optimizer step: the residual carries over between different batches
        previous = {
            n: codec.memory.residuals.get(n)
            if codec.memory.residuals.get(n) is not None
            else torch.zeros_like(getattr(model, n).weight)
            for n in names
        }
        tokens, labels = toy_batch(step, 8, 0, 1)
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(tokens), labels).backward()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens), labels).backward()
        strategy.synchronize()
        for n in names:
            local = getattr(plain, n).weight.grad
            delivered = getattr(model, n).weight.grad  # world size 1: exactly P̂ Q̂ᵀ
            torch.testing.assert_close(
                local + previous[n], delivered + codec.memory.residuals.get(n), rtol=0, atol=1e-12
            )
            assert codec.memory.residuals.get(n).abs().max() > 1e-6  # rank 2 < rank(G): something is left over
    strategy.close()


def _step_grads(model: ToyEncoder, strategy, step: int) -> list[torch.Tensor]:
    tokens, labels = toy_batch(step, 8, 0, 1)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(tokens), labels).backward()
    strategy.synchronize()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "fields",
    [
        dict(strategy="rankdad", rankdad_mode="oneway"),
        dict(strategy="rankdad", rankdad_mode="twoway", warm_start=False),
        dict(strategy="auto"),
    ],
)
def test_resuming_from_state_dict_continues_exactly(fields):
    """Residuals, warm-start factors, the step that seeds random starts (and auto's plan) survive a checkpoint."""
    cfg = CommConfig(rank=2, **fields)
    torch.manual_seed(0)
    model = ToyEncoder()
    resumed_model = ToyEncoder()
    resumed_model.load_state_dict(model.state_dict())  # no optimizer step: parameters stay equal

    straight = build_strategy(cfg)
    straight.attach(model)
    expected = [_step_grads(model, straight, step) for step in range(3)][-1]

    first = build_strategy(cfg)
    first.attach(resumed_model)
    for step in range(2):
        _step_grads(resumed_model, first, step)
    state = copy.deepcopy(first.state_dict())
    first.close()
    second = build_strategy(cfg)
    second.attach(resumed_model)
    second.load_state_dict(state)
    for got, want in zip(_step_grads(resumed_model, second, 2), expected):
        assert torch.equal(got, want)
    assert second.describe() == straight.describe()


def test_a_non_finite_step_leaves_the_memory_untouched():
    torch.manual_seed(0)
    model = ToyEncoder()
    strategy = build_strategy(CommConfig(strategy="rankdad", rank=2))
    strategy.attach(model)
    _step_grads(model, strategy, 0)
    before = copy.deepcopy(strategy.state_dict())
    tokens, labels = toy_batch(1, 8, 0, 1)
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(tokens), labels) * float("nan")).backward()
    strategy.synchronize()
    after = strategy.state_dict()
    for part in ("starts", "residuals"):
        assert before[part].keys() == after[part].keys()
        assert all(torch.equal(before[part][n], after[part][n]) for n in before[part])
    assert torch.isfinite(_step_grads(model, strategy, 2)[1]).all()  # and the next step is clean again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["dad", "rankdad", "auto"])
def test_strategies_on_cuda_match_plain_autograd(strategy):
    """Seeded starts, factors and the counts exchange on a CUDA model (one process: no collective crosses)."""
    torch.manual_seed(0)
    model = ToyEncoder().cuda()
    plain = copy.deepcopy(model)
    s = build_strategy(CommConfig(strategy=strategy, rank=32, power_iters=2))
    s.attach(model)
    tokens, labels = (t.cuda() for t in toy_batch(0, 8, 0, 1))
    F.cross_entropy(model(tokens), labels).backward()
    s.synchronize()
    F.cross_entropy(plain(tokens), labels).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.device.type == "cuda"
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 1e-4, name
