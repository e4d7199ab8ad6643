"""The encoder and the FPSA forward: parameter parity with vanilla, masks, the solver's freezing, and stats."""

from __future__ import annotations

import pytest
import torch

from dtrain.config import Config
from dtrain.data import TaskSpec
from dtrain.metrics import FPSA_CONVERGED_FRAC, FPSA_ITERS_LAYER, FPSA_ITERS_MEAN, FPSA_LOOP_LAYER
from dtrain.model import FixedPointAttention, build_model, spectral
from dtrain.model.solver import solve

PER_SEQ = TaskSpec(name="t", vocab_size=7, seq_len=10, num_classes=5, per_token=False, targets_per_example=1, pad_id=0)
PER_TOKEN = TaskSpec(
    name="t", vocab_size=7, seq_len=10, num_classes=5, per_token=True, targets_per_example=10, pad_id=None
)


def config(attention: str = "fpsa", **fpsa) -> Config:
    return Config.model_validate(
        {"model": {"attention": attention, "d_model": 16, "n_layers": 2, "n_heads": 2}, "fpsa": fpsa}
    )


def inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 7, (batch, 10), generator=g)
    lengths = torch.tensor([10, 6, 3])[:batch]
    mask = torch.arange(10)[None, :] < lengths[:, None]
    return tokens.masked_fill(~mask, 0), mask


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("spec", [PER_SEQ, PER_TOKEN])
def test_vanilla_and_fpsa_have_identical_parameters(spec):
    vanilla = shapes(build_model(config("vanilla"), spec))
    assert shapes(build_model(config("fpsa"), spec)) == vanilla
    assert shapes(build_model(config("fpsa", spectral_norm=True), spec)) == vanilla
    for name in ("q", "k", "v", "o"):
        assert vanilla[f"blocks.0.attn.{name}.weight"] == (16, 16)
    assert "blocks.0.attn.k.bias" not in vanilla  # softmax is blind to a key bias: no dead parameter
    for name in ("q", "v", "o"):
        assert vanilla[f"blocks.0.attn.{name}.bias"] == (16,)


def test_same_seed_gives_the_same_initial_parameters_for_every_attention():
    def initial(cfg: Config) -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        return dict(build_model(cfg, PER_SEQ).named_parameters())

    vanilla = initial(config("vanilla"))
    for fpsa in (initial(config()), initial(config(spectral_norm=True))):
        assert all(torch.equal(vanilla[name], p) for name, p in fpsa.items())


def test_learned_temperature_adds_one_parameter_per_head_and_is_fpsa_only():
    cfg = config()
    cfg.model.learned_temperature = True
    with_temperature = shapes(build_model(cfg, PER_SEQ))
    extra = set(with_temperature) - set(shapes(build_model(config(), PER_SEQ)))
    assert extra == {"blocks.0.attn.log_temperature", "blocks.1.attn.log_temperature"}
    assert with_temperature["blocks.0.attn.log_temperature"] == (2,)
    cfg = config("vanilla")
    with pytest.raises(ValueError, match="learned_temperature=true needs model.attention=fpsa"):
        cfg.model.learned_temperature = True  # the config itself refuses it, before any model is built


@pytest.mark.parametrize("spec", [PER_SEQ, PER_TOKEN])
def test_output_shapes(spec):
    tokens, mask = inputs()
    out = build_model(config(), spec)(tokens, mask)
    assert out.shape == ((3, 10, 5) if spec.per_token else (3, 5))


@pytest.mark.parametrize("backward", ["implicit", "phantom", "bptt"])
def test_one_undamped_iteration_is_vanilla_attention(backward):
    torch.manual_seed(0)
    vanilla = build_model(config("vanilla"), PER_TOKEN)
    fpsa = build_model(config(max_iter=1, damping=1.0, backward=backward), PER_TOKEN)
    fpsa.load_state_dict(vanilla.state_dict())
    tokens, mask = inputs()
    # padded positions are never iterated by FPSA (their attention output is 0): compare the real ones
    expected = vanilla(tokens, mask)[mask]
    torch.testing.assert_close(fpsa(tokens, mask)[mask], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fpsa(tokens), vanilla(tokens), rtol=1e-5, atol=1e-5)
    fpsa.blocks[0].attn.cfg = fpsa.blocks[0].attn.cfg.model_copy(update={"max_iter": 2})
    assert not torch.allclose(fpsa(tokens, mask)[mask], expected, rtol=1e-3, atol=1e-3)


def test_forward_value_does_not_depend_on_backward_mode():
    tokens, mask = inputs()
    outputs = []
    for backward in ("implicit", "phantom", "bptt"):
        torch.manual_seed(0)
        model = build_model(config(backward=backward, tol=1e-4, max_iter=12), PER_SEQ)
        outputs.append(model(tokens, mask))
        with torch.no_grad():
            outputs.append(model(tokens, mask))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attention", ["vanilla", "fpsa"])
@pytest.mark.parametrize("spec", [PER_SEQ, PER_TOKEN])
def test_padded_tokens_do_not_change_real_outputs(attention, spec):
    torch.manual_seed(0)
    model = build_model(config(attention, tol=1e-6, max_iter=20), spec)
    tokens, mask = inputs()
    other = torch.where(mask, tokens, torch.randint(1, 7, tokens.shape))
    assert not torch.equal(other, tokens)
    a, b = model(tokens, mask), model(other, mask)
    if spec.per_token:
        a, b = a[mask], b[mask]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if attention == "fpsa":
        padded_iters = [layer.last_solve.token_iters[~mask] for layer in model.fpsa_layers()]
        assert all(int(t.max()) == 0 for t in padded_iters)  # never iterated, never counted


def test_solver_freezes_converged_tokens_and_skips_padding():
    # token 0 changes by 1e-9 relative per step (stops after its first step), token 1 by 10% (never stops),
    # token 2 is padding; a frozen token must keep exactly the value it had when it stopped.
    rates = torch.tensor([1e-9, 0.1, 0.5], dtype=torch.float64)[None, :, None]
    z0 = torch.ones(1, 3, 4, dtype=torch.float64)
    real = torch.tensor([[True, True, False]])
    z, stats = solve(lambda z: z * (1 + rates), z0, real, tol=1e-6, max_iter=7)
    assert stats.token_iters.tolist() == [[1, 7, 0]]
    assert stats.converged.tolist() == [[True, False, False]]
    assert stats.iters == 7 and stats.example_iters().tolist() == [7]
    assert torch.equal(z[0, 0], torch.full((4,), 1 + 1e-9, dtype=torch.float64))
    torch.testing.assert_close(z[0, 1], torch.full((4,), 1.1**7, dtype=torch.float64))
    assert torch.equal(z[0, 2], z0[0, 2])


def test_solver_stops_when_every_token_has_converged():
    z0 = torch.ones(2, 3, 4)
    target = torch.full_like(z0, 3.0)
    z, stats = solve(lambda z: target, z0, torch.ones(2, 3, dtype=torch.bool), tol=1e-6, max_iter=50)
    assert stats.iters == 2 and bool(stats.converged.all()) and torch.equal(z, target)


def test_fpsa_stats_and_per_example_iterations():
    torch.manual_seed(0)
    model = build_model(config(tol=1e-3, max_iter=30), PER_SEQ)
    assert build_model(config("vanilla"), PER_SEQ).fpsa_stats() == {}
    with pytest.raises(RuntimeError):
        model.fpsa_example_iters()
    tokens, mask = inputs()
    with torch.no_grad():
        model(tokens, mask)
    stats = model.fpsa_stats()
    iters_l0, iters_l1 = FPSA_ITERS_LAYER.format(layer=0), FPSA_ITERS_LAYER.format(layer=1)
    loop_l0 = FPSA_LOOP_LAYER.format(layer=0)
    assert {FPSA_ITERS_MEAN, iters_l0, iters_l1, FPSA_CONVERGED_FRAC} <= set(stats)
    assert stats[FPSA_ITERS_MEAN] == pytest.approx((stats[iters_l0] + stats[iters_l1]) / 2)
    assert 1 <= stats[iters_l0] <= stats[loop_l0] <= 30
    assert 0.0 <= stats[FPSA_CONVERGED_FRAC] <= 1.0
    per_layer = [model.fpsa_example_iters(i) for i in range(2)]
    assert per_layer[0].shape == (3,) and per_layer[0].dtype == torch.int64
    assert torch.equal(model.fpsa_example_iters(), per_layer[0] + per_layer[1])
    solve_stats = model.blocks[0].attn.last_solve
    assert torch.equal(per_layer[0], solve_stats.token_iters.amax(dim=1))
    assert int(per_layer[0].max()) == stats[loop_l0]


def test_spectral_norm_divides_by_the_largest_singular_value_once_per_forward():
    torch.manual_seed(0)
    weight = torch.randn(16, 16)
    u = spectral.init_vector(weight)
    normalised = spectral.normalise(weight, u, update=False)
    assert torch.linalg.matrix_norm(normalised, ord=2).item() == pytest.approx(1.0, rel=1e-3)

    model = build_model(config(spectral_norm=True), PER_SEQ)
    attn: FixedPointAttention = model.blocks[0].attn
    tokens, mask = inputs()
    model.eval()
    before = attn.q_sigma_u.clone()
    model(tokens, mask)
    assert torch.equal(attn.q_sigma_u, before)  # evaluation does not advance the power iteration
    model.train()
    model(tokens, mask)
    assert not torch.equal(attn.q_sigma_u, before)
    assert "blocks.0.attn.q_sigma_u" in model.state_dict()
