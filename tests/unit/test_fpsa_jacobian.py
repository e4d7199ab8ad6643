"""fpsa.jac_reg: the Hutchinson estimate of ‖∂U/∂Z‖²_F at the fixed point against the dense Jacobian, its
gradient against finite differences, and when there is a penalty at all."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtrain.config import Config
from dtrain.data import TaskSpec
from dtrain.metrics import FPSA_JAC_PENALTY
from dtrain.model import build_model, regularisation_loss
from dtrain.model.attention import key_padding_bias, split_heads

SPEC = TaskSpec(name="t", vocab_size=7, seq_len=6, num_classes=5, per_token=False, targets_per_example=1, pad_id=0)
LENGTHS = [6, 4]
SAMPLES = 200  # Hutchinson estimates averaged


def _model(jac_reg: float = 1.0):
    cfg = Config.model_validate(
        {
            "model": {"d_model": 8, "n_layers": 1, "n_heads": 2},
            "fpsa": {"jac_reg": jac_reg, "max_iter": 80, "tol": 1e-12, "damping": 1.0},
        }
    )
    torch.manual_seed(0)
    return build_model(cfg, SPEC).double()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.arange(SPEC.seq_len)[None, :] < torch.tensor(LENGTHS)[:, None]
    tokens = torch.randint(1, 7, (len(LENGTHS), SPEC.seq_len), generator=torch.Generator().manual_seed(1))
    return tokens.masked_fill(~mask, 0), mask


def _fixed_point(model, tokens: torch.Tensor, mask: torch.Tensor):
    """The first block's attention, its input X and its fixed point Z* (no grad)."""
    block = model.blocks[0]
    with torch.no_grad():
        x = block.ln_attn(model.embed(tokens) + model.pos(torch.arange(SPEC.seq_len)))
        z_star = block.attn(x, mask) + x
    return block.attn, x, z_star


def _exact_penalty(model) -> float:
    """‖∂U/∂Z‖²_F over the real tokens' rows and columns, per (real token x d_model), from the dense Jacobian."""
    tokens, mask = _inputs()
    attn, x, z_star = _fixed_point(model, tokens, mask)
    v = split_heads(attn.v(x), attn.n_heads).detach()
    maps = attn._frozen_maps(attn._loop_weights(), attn._scale())
    bias = key_padding_bias(mask, x.dtype)
    total = 0.0
    for b, n in enumerate(LENGTHS):

        def u(z, b=b):
            return attn.update(maps, z[None], v[b : b + 1], bias[b : b + 1])[0]

        jac = torch.autograd.functional.jacobian(u, z_star[b])  # [L, D, L, D]
        total += jac[:n, :, :n, :].pow(2).sum().item()
    return total / (sum(LENGTHS) * z_star.shape[-1])


def test_the_hutchinson_estimate_averages_to_the_dense_jacobian_norm():
    model = _model()
    tokens, mask = _inputs()
    exact = _exact_penalty(model)
    samples = []
    for _ in range(SAMPLES):
        model(tokens, mask)
        samples.append(model.blocks[0].attn.jac_penalty.item())
    samples = torch.tensor(samples, dtype=torch.float64)
    # the mean's standard error is std / √SAMPLES; allow 4 of them
    assert abs(samples.mean().item() - exact) < 4 * samples.std().item() / SAMPLES**0.5, (samples.mean(), exact)
    assert model.fpsa_stats()[FPSA_JAC_PENALTY] == samples[-1].item()


def test_the_penalty_gradient_matches_finite_differences():
    """With the probe vector fixed (same seed) and Z* held constant (the penalty's gradient treats the fixed
    point as a constant, as Bai et al. do), the penalty is a smooth function of the parameters."""
    model = _model()
    tokens, mask = _inputs()
    attn, x, z_star = _fixed_point(model, tokens, mask)
    bias = key_padding_bias(mask, x.dtype)
    params = [attn.q.weight, attn.k.weight, attn.o.weight, attn.v.weight, attn.q.bias]
    direction = [torch.randn_like(p) for p in params]

    def penalty() -> torch.Tensor:
        torch.manual_seed(5)
        v = split_heads(attn.v(x), attn.n_heads)
        return attn._jacobian_penalty(z_star, v, bias, mask, attn._loop_weights(), attn._scale())

    grads = torch.autograd.grad(penalty(), params)
    slope = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    eps = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        values.append(penalty().item())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    finite = (values[0] - values[1]) / (2 * eps)
    assert abs(slope - finite) < 1e-6 * abs(finite), (slope, finite)


def test_there_is_a_penalty_only_in_training_with_jac_reg():
    tokens, mask = _inputs()
    plain = _model(jac_reg=0.0)
    plain(tokens, mask)
    assert regularisation_loss(plain) is None
    model = _model(jac_reg=2.0)
    model(tokens, mask)
    assert regularisation_loss(model).item() == 2.0 * model.blocks[0].attn.jac_penalty.item()
    model.eval()
    with torch.no_grad():
        model(tokens, mask)
    assert regularisation_loss(model) is None


def test_a_capturing_strategy_gets_the_penalty_gradient_as_rows():
    """dAD's capture (compression/capture.py) on a model trained with the penalty: the recorded rows of q, k, o,
    v give loss + penalty's exact weight gradient (the penalty's second derivative included), and no weight gets
    a dense gradient, so rank-dAD compresses the penalty's share with the rest instead of all-reducing it."""
    from dtrain.compression.capture import attach_linears

    tokens, mask = _inputs()
    labels = torch.tensor([1, 3])
    captured, plain = _model(jac_reg=3.0), _model(jac_reg=3.0)
    attn = captured.blocks[0].attn
    captures = {c.name: c for c in attach_linears(captured)}
    for model in (captured, plain):
        torch.manual_seed(7)  # the same Hutchinson probe
        logits = model(tokens, mask)
        (F.cross_entropy(logits, labels) + regularisation_loss(model)).backward()
    for name in ("q", "k", "v", "o"):
        capture = captures[f"blocks.0.attn.{name}"]
        assert not capture.dense_grad_arrived and getattr(attn, name).weight.grad is None, name
        a, delta = capture.take()
        expected = getattr(plain.blocks[0].attn, name).weight.grad
        torch.testing.assert_close(delta.T @ a, expected, rtol=1e-9, atol=1e-12)
