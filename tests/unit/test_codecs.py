"""The per-layer codecs alone, on one process (Comm without a process group): decode = Δᵀ A, payload = the
cost model's bytes per peer, error feedback adds up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtrain.compression.capture import LinearCapture
from dtrain.compression.codecs.base import LayerStep
from dtrain.compression.codecs.factors import FactorsCodec
from dtrain.compression.codecs.rows import RowsCodec
from dtrain.compression.codecs.subspace import SubspaceCodec
from dtrain.compression.comm import Comm
from dtrain.compression.lowrank import orthonormalize
from dtrain.config import CommConfig

IN, OUT, ROWS = 7, 5, 9


def _layer(rows: int = ROWS, seed: int = 0) -> LayerStep:
    g = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.zeros(OUT, IN))
    capture = LinearCapture("layer", weight)
    a, delta = torch.randn(rows, IN, generator=g), torch.randn(rows, OUT, generator=g)
    return LayerStep(capture, a, delta, [rows], False)


def _factors(**options) -> FactorsCodec:
    codec = FactorsCodec(CommConfig(strategy="rankdad", **options).options())
    codec.bind(["layer"])
    return codec


@pytest.mark.parametrize(
    "codec",
    [RowsCodec(), _factors(rank=min(IN, OUT), power_iters=4, error_feedback=False)],
    ids=["rows", "factors-full-rank"],
)
def test_decode_is_the_local_weight_gradient_and_payload_matches_the_cost_model(codec):
    layer, comm = _layer(), Comm()
    grad = codec.finish(codec.launch(layer, comm), comm)
    torch.testing.assert_close(grad, layer.delta.T @ layer.a, rtol=1e-5, atol=1e-5)
    # at S peers a rank sends its payload to S-1 of them: the cost model's bytes per peer are the payload
    assert comm.reset().bytes_sent == codec.wire_bytes(IN, OUT, ROWS, world_size=2)


def test_no_rows_anywhere_sends_nothing_and_decodes_to_none():
    for codec in (RowsCodec(), _factors(rank=2)):
        layer, comm = _layer(rows=0), Comm()
        assert codec.finish(codec.launch(layer, comm), comm) is None
        assert comm.reset().bytes_sent == 0


def _alternating(**options) -> SubspaceCodec:
    codec = SubspaceCodec(CommConfig(strategy="rankdad", rankdad_mode="alternating", **options).options())
    codec.bind(["layer"])
    return codec


def _summed(**options) -> SubspaceCodec:
    codec = SubspaceCodec(CommConfig(strategy="rankdad", rankdad_mode="allreduce", **options).options())
    codec.bind(["layer"])
    return codec


@pytest.mark.parametrize(
    "make, steps, fmt",
    [(_factors, 4, "bf16"), (_alternating, 5, "bf16"), (_alternating, 5, "int8"), (_summed, 4, "fp8")],
    ids=["factors", "alternating", "alternating-int8", "allreduce-fp8"],
)
def test_error_feedback_adds_up_over_steps(make, steps, fmt):
    """Σ_steps gradients = Σ_steps delivered + last residual (the ErrorFeedback invariant, per layer); alternating
    over P and Q steps; 8-bit factors through the quantized sum, whose losses the residual holds too."""
    codec, comm = make(rank=1, factor_dtype=fmt), Comm()
    total_grad = torch.zeros(OUT, IN, dtype=torch.float64)
    total_delivered = torch.zeros_like(total_grad)
    for step in range(steps):
        layer = _layer(seed=step)
        total_grad += (layer.delta.T @ layer.a).double()
        total_delivered += codec.finish(codec.launch(layer, comm), comm).double()
        codec.end_step()
    residual = codec.memory.residuals.get("layer").double()
    torch.testing.assert_close(total_delivered + residual, total_grad, rtol=0, atol=1e-4)
    assert residual.abs().max() > 1e-3  # rank 1 < rank of the gradient: something was left over


def test_alternating_projects_on_the_last_step_subspace_one_side_per_step():
    """Even steps: G = M Q̂ Q̂ᵀ with Q̂ = orth(last Q), only P (out x k) sent; odd steps: G = P̂ P̂ᵀ M with P̂ = orth(the
    P just sent, kept transposed), only Q (in x k) sent; the cost model's bytes are the larger of the two."""
    codec, comm = _alternating(rank=2, error_feedback=False), Comm()
    sent = []
    for step in range(4):
        layer = _layer(seed=step)
        m = layer.delta.T @ layer.a
        last = codec.memory.starts.get("layer")
        pending = codec.launch(layer, comm)
        basis = pending.data["basis"]
        grad = codec.finish(pending, comm)
        codec.end_step()
        sent.append(comm.reset().bytes_sent)
        if step % 2 == 0:
            torch.testing.assert_close(grad, m @ basis @ basis.T, rtol=1e-5, atol=1e-5)
            if last is not None:  # the basis is the Q the previous step all-reduced, orthonormalised
                torch.testing.assert_close(basis @ basis.T, orthonormalize(last) @ orthonormalize(last).T)
        else:
            torch.testing.assert_close(basis, orthonormalize(last.T))  # the P of the step before
            torch.testing.assert_close(grad, basis @ basis.T @ m, rtol=1e-5, atol=1e-5)
    assert sent == [OUT * 2 * 4, IN * 2 * 4] * 2
    assert max(sent) == codec.wire_bytes(IN, OUT, ROWS, world_size=2)  # the larger side: a budget holds every step


def test_alternating_keeps_alternating_across_a_step_that_changed_nothing():
    """The side follows what is stored, not the step count: after a non-finite step is undone (memory as it was,
    step counter advanced) the layer goes on with the side it was due for, from the subspace it had."""
    codec, comm = _alternating(rank=2, error_feedback=False), Comm()
    layer = _layer()
    for _ in range(3):  # P, Q, P
        codec.finish(codec.launch(layer, comm), comm)
        codec.end_step()
    stored = codec.memory.starts.get("layer").clone()
    bad = _layer()
    bad.a[0, 0] = float("nan")
    codec.finish(codec.launch(bad, comm), comm)  # the Q step, non-finite: undone
    codec.end_step()
    assert torch.equal(codec.memory.starts.get("layer"), stored)
    pending = codec.launch(layer, comm)
    assert pending.data["side"] == "Q"  # still the Q step, now on an even step count
    torch.testing.assert_close(pending.data["basis"], orthonormalize(stored.T))


def test_alternating_on_a_fixed_gradient_converges_to_its_best_rank_k_approximation():
    """Half a power iteration per step is still the power iteration: on the same M every step, G → M_k."""
    codec, comm = _alternating(rank=2, error_feedback=False), Comm()
    layer = _layer()
    m = layer.delta.T @ layer.a
    u, s, vh = torch.linalg.svd(m)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    for _ in range(60):
        grad = codec.finish(codec.launch(layer, comm), comm)
        codec.end_step()
    assert (grad - best).norm() / m.norm() < 1e-4


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_8_bit_summed_factors_at_full_rank_decode_the_gradient_to_their_precision(fmt):
    """k = min(in, out): P̂ spans the column space, so G = P̂ Qᵀ is Δᵀ A up to Q's two encodings (a factor packed
    or unpacked in the wrong order would be off by ~1)."""
    codec, comm = _summed(rank=min(IN, OUT), factor_dtype=fmt, error_feedback=False), Comm()
    layer = _layer()
    grad = codec.finish(codec.launch(layer, comm), comm)
    exact = layer.delta.T @ layer.a
    assert ((grad - exact).norm() / exact.norm()).item() < {"int8": 2 / 127, "fp8": 2 / 16}[fmt]


@pytest.mark.parametrize("make", [_summed, _alternating], ids=["allreduce", "alternating"])
def test_a_nan_survives_8_bit_factors_so_the_step_is_undone(make):
    """int8 would round NaN to a finite 0: the block's scale keeps it, the decoded gradient is not finite, and the
    step leaves residuals and warm starts as they were (not a NaN residual that zeroes every later step)."""
    codec, comm = make(rank=2, factor_dtype="int8"), Comm()
    codec.finish(codec.launch(_layer(), comm), comm)
    codec.end_step()
    residual, start = codec.memory.residuals.get("layer").clone(), codec.memory.starts.get("layer").clone()
    bad = _layer(seed=1)
    bad.delta[0, 0] = float("nan")
    assert not torch.isfinite(codec.finish(codec.launch(bad, comm), comm)).all()
    codec.end_step()
    assert torch.equal(codec.memory.residuals.get("layer"), residual)
    assert torch.equal(codec.memory.starts.get("layer"), start)
