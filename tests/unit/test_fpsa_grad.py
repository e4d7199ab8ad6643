"""FPSA gradients: implicit == BPTT through many iterations, phantom's error, what a capturing strategy sees, and
memory that does not grow with the iteration count."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dtrain.config import Config
from dtrain.data import TaskSpec
from dtrain.metrics import FPSA_ADJ_ITERS_LAYER, FPSA_LOOP_LAYER
from dtrain.model import build_model

SPEC = TaskSpec(name="t", vocab_size=7, seq_len=8, num_classes=5, per_token=False, targets_per_example=1, pad_id=0)
ITERS = 50  # every token runs all of them: tol is far below float64 resolution (and the plain iteration never
# lands exactly on the fixed point, which Anderson can)


def config(learned_temperature: bool = False, **fpsa) -> Config:
    fpsa = {
        "max_iter": ITERS,
        "tol": 1e-300,
        "damping": 0.5,
        "anderson_memory": 0,
        "adj_max_iter": 400,
        "adj_tol": 1e-13,
        **fpsa,
    }
    return Config.model_validate(
        {
            "model": {"d_model": 12, "n_layers": 2, "n_heads": 3, "learned_temperature": learned_temperature},
            "fpsa": fpsa,
        }
    )


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 7, (3, 8), generator=g)
    mask = torch.arange(8)[None, :] < torch.tensor([8, 5, 3])[:, None]
    return tokens.masked_fill(~mask, 0), mask, torch.tensor([0, 3, 4])


def contractive_model(learned_temperature: bool = False, **fpsa):
    torch.manual_seed(0)
    model = build_model(config(learned_temperature, **fpsa), SPEC).double()
    with torch.no_grad():  # small W_Q, W_K, W_O keep the attention map well inside contraction
        for block in model.blocks:
            for name in ("q", "k", "o"):
                getattr(block.attn, name).weight.mul_(0.5)
            if learned_temperature:  # away from the initial 1 so that its gradient is a generic one
                block.attn.log_temperature.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return model


def gradients(model, backward: str, **fpsa) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)  # same parameters and spectral-norm vectors for every mode
    for block in model.blocks:
        block.attn.cfg = block.attn.cfg.model_copy(update={"backward": backward, **fpsa})
    tokens, mask, targets = batch()
    F.cross_entropy(model(tokens, mask), targets).backward()
    assert model.fpsa_stats()[FPSA_LOOP_LAYER.format(layer=0)] == ITERS
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def relative_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """||got - ref|| / ||ref|| per parameter, with ||ref|| floored at 1e-8 of the largest gradient norm: without
    re-injection the true gradients of W_Q, W_K and b_Q are exactly zero (the fixed point has every token equal,
    so attention is uniform) and ref is rounding noise there."""
    floor = 1e-8 * max(g.norm() for g in ref.values())
    return {name: ((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(floor)).item() for name in ref}


@pytest.mark.parametrize("variant", [{}, {"spectral_norm": True}, {"reinject": False}, {"learned_temperature": True}])
def test_implicit_gradient_of_every_parameter_matches_bptt(variant):
    model = contractive_model(**variant)
    reference = gradients(model, "bptt")
    errors = relative_errors(gradients(model, "implicit"), reference)
    worst = max(errors, key=errors.get)
    print(f"{variant}: worst relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] < 1e-4, (worst, errors[worst])


def test_phantom_gradient_error_is_measured():
    """Phantom is a truncated Neumann series: biased, so its error is printed, not bounded; more steps must help."""
    model = contractive_model()
    reference = gradients(model, "bptt")
    flat_ref = torch.cat([g.flatten() for g in reference.values()])
    whole = []
    for steps in (1, 4):
        got = gradients(model, "phantom", phantom_steps=steps)
        flat = torch.cat([g.flatten() for g in got.values()])
        whole.append(((flat - flat_ref).norm() / flat_ref.norm()).item())
        errors = relative_errors(got, reference)
        attention = [e for name, e in errors.items() if ".attn." in name]
        print(
            f"phantom_steps={steps}: relative error vs BPTT, whole gradient {whole[-1]:.3g}; attention "
            f"parameters max {max(attention):.3g}, mean {sum(attention) / len(attention):.3g}"
        )
    assert whole[1] < whole[0]


def count_projection_calls(model, backward: str, **fpsa) -> Counter:
    """Calls of each q/k/v/o module made with grad enabled, over one forward AND backward."""
    for block in model.blocks:
        block.attn.cfg = block.attn.cfg.model_copy(update={"backward": backward, **fpsa})
    calls: Counter = Counter()
    handles = []
    for i, block in enumerate(model.blocks):
        for name in ("q", "k", "v", "o"):

            def hook(module, args, output, key=f"l{i}.{name}"):
                if torch.is_grad_enabled():
                    calls[key] += 1

            handles.append(getattr(block.attn, name).register_forward_hook(hook))
    tokens, mask, targets = batch()
    F.cross_entropy(model(tokens, mask), targets).backward()
    for handle in handles:
        handle.remove()
    return calls


def test_implicit_mode_calls_each_projection_once_with_grad():
    model = build_model(config(max_iter=10, tol=1e-3, adj_max_iter=5), SPEC)
    calls = count_projection_calls(model, "implicit")
    assert calls == Counter({f"l{i}.{n}": 1 for i in range(2) for n in "qkvo"})
    assert model.fpsa_stats()[FPSA_ADJ_ITERS_LAYER.format(layer=0)] >= 1  # the adjoint did run, through F.linear only
    calls = count_projection_calls(model, "phantom", phantom_steps=3)
    assert calls == Counter({f"l{i}.{n}": (1 if n == "v" else 3) for i in range(2) for n in "qkvo"})
    calls = count_projection_calls(model, "bptt")
    loops = [int(model.fpsa_stats()[FPSA_LOOP_LAYER.format(layer=i)]) for i in range(2)]
    assert calls == Counter({f"l{i}.{n}": (1 if n == "v" else loops[i]) for i in range(2) for n in "qkvo"})


def saved_bytes(backward: str, max_iter: int) -> int:
    torch.manual_seed(0)
    model = build_model(config(backward=backward, max_iter=max_iter, tol=1e-30, adj_max_iter=5), SPEC)
    tokens, mask, targets = batch()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(tokens, mask), targets)
    loss.backward()
    return total


def test_implicit_saved_memory_does_not_grow_with_iterations():
    assert saved_bytes("implicit", 2) == saved_bytes("implicit", 24)
    assert saved_bytes("bptt", 24) > 5 * saved_bytes("bptt", 2)


def test_implicit_gradient_matches_bptt_on_a_trained_model():
    """The quickstart's recipe on a small model (S5, Jacobian penalty, Anderson, tol 2e-5), trained briefly: at
    the trained parameters the implicit gradient agrees with BPTT through the same solve and with BPTT through
    the plain iteration run to convergence (the exact gradient of the fixed point)."""
    from bench.fpsa_gradient_check import EXACT, gradient
    from dtrain.data import build_task
    from dtrain.trainer import loss_fn

    cfg = Config.model_validate(
        {
            "model": {"d_model": 16, "n_layers": 2, "n_heads": 2},
            "fpsa": {"max_iter": 12, "tol": 2e-5, "damping": 1.0, "jac_reg": 3.0},
            "data": {"task": "s5", "seq_len": 8},
        }
    )
    task = build_task(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, task.spec)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        b = task.batch("train", step * 32, 32)
        loss = loss_fn(model(b.tokens, b.mask), b.targets, task.spec.targets_per_example)
        (loss + model.regularisation_loss()).backward()
        opt.step()
        opt.zero_grad()
    batch = task.batch("train", 10_000, 64)
    state = model.state_dict()
    implicit, stats = gradient(cfg, state, batch, {"backward": "implicit"})
    bptt, _ = gradient(cfg, state, batch, {"backward": "bptt"})
    exact, exact_stats = gradient(cfg, state, batch, {**EXACT, "max_iter": 200})
    assert exact_stats["fpsa/converged_frac"] == 1.0, exact_stats
    errors = [((implicit - ref).norm() / ref.norm()).item() for ref in (bptt, exact)]
    print(f"trained model: implicit vs bptt {errors[0]:.2e}, vs exact {errors[1]:.2e}; solver {stats}")
    assert max(errors) < 1e-4, errors
