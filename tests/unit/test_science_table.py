"""bench/science_table.py's pure pieces: the t-interval, the control's config (and that it IS vanilla attention
looped N times with shared weights, trained by BPTT), N from SELF's iterations, and the table rendering."""

from __future__ import annotations

import math

import pytest
import torch

from bench.science_table import (
    COMMON,
    CONTROL_TOL,
    SELF_FPSA,
    TASKS,
    control_iterations,
    model_overrides,
    render_paired,
    render_table,
    t_interval,
    table_rows,
)
from dtrain.config import load_config
from dtrain.model import FixedPointAttention
from dtrain.model.attention import VanillaAttention


def test_t_interval():
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t(0.975, 2 df) x s / sqrt(n), s = 1
    mean, half = t_interval([0.5])
    assert mean == 0.5 and math.isnan(half)


def test_control_iterations_rounds_up_the_mean():
    assert control_iterations([3.2, 3.9, 4.0]) == 4
    assert control_iterations([4.0 + 1e-9] * 3) == 4  # float noise does not add an iteration
    assert control_iterations([4.01, 4.0, 4.0]) == 5
    assert control_iterations([0.5]) == 1


def test_control_config():
    cfg = load_config(None, [*COMMON, *TASKS["s5"].sets, "model.attention=fpsa", *model_overrides("control", 3)])
    f = cfg.fpsa
    assert (f.backward, f.damping, f.anderson_memory, f.jac_reg, f.max_iter, f.tol) == (
        "bptt",
        1.0,
        0,
        0.0,
        3,
        CONTROL_TOL,
    )
    assert f.reinject and not f.spectral_norm and not cfg.model.learned_temperature
    self_cfg = load_config(None, [*COMMON, "model.attention=fpsa", *model_overrides("self")])
    assert self_cfg.fpsa.backward == "implicit" and self_cfg.fpsa.tol == 2e-5 and len(SELF_FPSA) == 7
    assert model_overrides("vanilla") == []


def looped_attention(layer: FixedPointAttention, x: torch.Tensor, n: int) -> torch.Tensor:
    """Z_0 = X, Z_{k+1} = X + W_O softmax(Q(Z_k) K(Z_k)ᵀ / √d_h) V(X), written out; returns Z_n - X."""
    b, length, d = x.shape
    h = layer.n_heads

    def heads(t):
        return t.view(b, length, h, d // h).transpose(1, 2)

    v = heads(layer.v(x))
    z = x
    for _ in range(n):
        scores = heads(layer.q(z)) @ heads(layer.k(z)).transpose(-1, -2) / math.sqrt(d // h)
        z = x + layer.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, d))
    return z - x


@pytest.mark.parametrize("n", [1, 3])
def test_control_is_vanilla_attention_looped_with_shared_weights(n):
    cfg = load_config(None, ["model.attention=fpsa", "model.d_model=16", *model_overrides("control", n)])
    torch.manual_seed(0)
    layer = FixedPointAttention(16, 4, cfg.fpsa)
    x = torch.randn(2, 5, 16)
    out = layer(x)
    # every token ran exactly n iterations: nothing stopped early
    assert bool((layer.last_solve.token_iters == n).all())
    expected = looped_attention(layer, x, n)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # BPTT: the gradient is the exact gradient of the n-step loop
    params = list(layer.parameters())
    got = torch.autograd.grad(out.pow(2).sum(), params)
    want = torch.autograd.grad(expected.pow(2).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    if n == 1:  # one pass is exactly the vanilla layer with the same weights
        vanilla = VanillaAttention(16, 4)
        vanilla.load_state_dict(layer.state_dict())
        torch.testing.assert_close(out, vanilla(x), rtol=1e-5, atol=1e-6)


def fake(task, model, seed, acc, seconds, lengths=("8",)):
    return {
        "task": task,
        "model": model,
        "seed": seed,
        "accuracy": {length: acc for length in lengths},
        "held_out_iters": {length: (math.nan if model == "vanilla" else 3.0) for length in lengths},
        "seconds": seconds,
        "step_ms": seconds * 10,
    }


def test_render_table():
    results = [
        fake("s5", m, s, 0.5 + 0.1 * s, t, ("8", "16")) for m, t in (("vanilla", 2.0), ("self", 6.0)) for s in range(3)
    ]
    results.append(fake("parity", "vanilla", 0, 0.9, 1.0, ("16",)))
    rows = table_rows(results)
    assert [(r.task, r.length, r.model) for r in rows] == [
        ("s5", "8", "vanilla"),
        ("s5", "8", "self"),
        ("s5", "16", "vanilla"),
        ("s5", "16", "self"),
        ("parity", "16", "vanilla"),
    ]
    text = render_table(rows)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert f"| s5 | 8 | self | 0.600 ± {half:.3f} | 0.500 / 0.600 / 0.700 | 3.00 | 6.0 | 3.00 | 60.0 | 3.00 |" in lines
    assert "| s5 | 16 | vanilla | 0.600 ± " in text and "(same runs)" in lines[4]
    assert "| parity | 16 | vanilla | 0.900 | 0.900 | 1 (one pass) | 1.0 | 1.00 | 10.0 | 1.00 |" in lines


def test_render_paired():
    results = [fake("parity", "vanilla", s, 0.7 + 0.01 * s, 1.0, ("16",)) for s in range(3)]
    results += [fake("parity", "self", s, 0.6 + 0.02 * s, 1.0, ("16",)) for s in range(3)]
    lines = render_paired(results).strip().splitlines()
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert lines[2] == f"| parity | 16 | self | -0.090 ± {half:.3f} | -0.100 / -0.090 / -0.080 |"
    assert len(lines) == 3  # no row for vanilla against itself
