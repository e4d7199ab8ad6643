"""The capture rule of the dAD family (dtrain/compression/capture.py) on one process: the (A, Δ) rows of every
managed nn.Linear call give the exact weight gradient, without autograd ever forming it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.compression.capture import attach_linears
from tests.helpers.probes import LargestTensor


class _Recurrent(nn.Module):
    """One Linear applied several times per forward (a hand-unrolled recurrence)."""

    def __init__(self, d: int = 6, steps: int = 3) -> None:
        super().__init__()
        self.cell = nn.Linear(d, d)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(self.steps):
            h = torch.tanh(self.cell(h) + x)
        return h


def _twin(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)  # before attach: an uncaptured copy


def test_capture_of_repeated_calls_gives_the_exact_weight_gradient():
    torch.manual_seed(0)
    model = _Recurrent()
    plain = _twin(model)
    x = torch.randn(2, 5, 6)  # (batch, seq, features): rows are batch × seq × calls
    (capture,) = attach_linears(model)
    with torch.no_grad():
        model(x)  # not recorded: no backward will come
    model(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert model.cell.weight.grad is None  # autograd never formed the local weight gradient
    torch.testing.assert_close(model.cell.bias.grad, plain.cell.bias.grad)
    a, delta = capture.take()
    assert a.shape == (2 * 5 * 3, 6) and delta.shape == (2 * 5 * 3, 6)
    torch.testing.assert_close(delta.T @ a, plain.cell.weight.grad, rtol=1e-6, atol=1e-6)
    assert capture.take()[0].shape[0] == 0  # take() starts a new step
    capture.remove()
    assert "forward" not in model.cell.__dict__
    assert [n for n, _ in model.named_parameters()] == ["cell.weight", "cell.bias"]


def test_capture_ignores_vector_jacobian_products_wrt_activations():
    """A nested autograd.grad(f, z) runs through the captured backward but is no weight gradient."""
    torch.manual_seed(0)
    model = _Recurrent(steps=1)
    plain = _twin(model)
    (capture,) = attach_linears(model)
    x = torch.randn(4, 6)

    def run(m: nn.Module) -> None:
        z = (x * 2).requires_grad_()
        probe = torch.tanh(m.cell(z))  # only used through a vector-Jacobian product
        out = m(x)

        def adjoint(g: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(probe, z, g, retain_graph=True)
            return g + 0.1 * vjp

        out.register_hook(adjoint)
        out.sum().backward()

    run(model)
    run(plain)
    a, delta = capture.take()
    assert a.shape[0] == 4  # the main call only
    torch.testing.assert_close(delta.T @ a, plain.cell.weight.grad, rtol=1e-6, atol=1e-6)
    capture.remove()


def test_capture_flags_an_ordinary_gradient_and_reports_each_delta():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    (capture,) = attach_linears(lin)
    seen = []
    capture.on_delta = lambda c: seen.append(c.pending)
    x = torch.randn(3, 4)
    lin(lin(x)).sum().backward()
    assert seen == [1, 0] and not capture.dense_grad_arrived and lin.weight.grad is None
    (lin(x) + F.linear(x, lin.weight)).sum().backward()
    assert capture.dense_grad_arrived
    torch.testing.assert_close(lin.weight.grad, torch.ones(4, 3) @ x)  # only the F.linear part
    capture.remove()


def test_captured_backward_never_forms_the_weight_gradient():
    out, inp, rows = 64, 48, 5
    captured, plain = nn.Linear(inp, out), nn.Linear(inp, out)
    attach_linears(captured)
    x = torch.randn(rows, inp, requires_grad=True)
    sizes = {}
    for name, layer in (("captured", captured), ("plain", plain)):
        y = layer(x).sum()
        with LargestTensor() as mode:
            y.backward()
        sizes[name] = mode.largest
    assert sizes["captured"] < out * inp <= sizes["plain"]  # the control shows the detector sees W's gradient
