"""model.positions: learned (the default, a data.seq_len table) or sinusoidal (no parameters, any length)."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.config import Config
from dtrain.data import TaskSpec
from dtrain.model import build_model
from dtrain.model.transformer import sinusoidal_positions

SPEC = TaskSpec(name="t", vocab_size=7, seq_len=6, num_classes=5, per_token=True, targets_per_example=6, pad_id=None)


def config(attention: str, positions: str) -> Config:
    return Config.model_validate(
        {"model": {"attention": attention, "d_model": 16, "n_layers": 2, "n_heads": 2, "positions": positions}}
    )


def test_sinusoidal_table():
    table = sinusoidal_positions(torch.arange(5), 6)
    assert table.shape == (5, 6)
    for p in range(5):
        for i in range(3):
            angle = p / 10000 ** (2 * i / 6)
            assert math.isclose(table[p, 2 * i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[p, 2 * i + 1], math.cos(angle), abs_tol=1e-6)
    # a prefix of a longer table is the shorter table: positions mean the same at every length
    torch.testing.assert_close(sinusoidal_positions(torch.arange(10), 6)[:5], table)


def test_learned_is_the_default_and_sized_to_the_task():
    model = build_model(Config.model_validate({"model": {"d_model": 16, "n_heads": 2}}), SPEC)
    assert model.pos.weight.shape == (SPEC.seq_len, 16)


def test_sinusoidal_models_have_no_position_parameters_and_run_at_twice_the_length():
    names = {}
    for attention in ("vanilla", "fpsa"):
        torch.manual_seed(0)
        model = build_model(config(attention, "sinusoidal"), SPEC)
        names[attention] = [n for n, _ in model.named_parameters()]
        assert not any(n.startswith("pos.") for n in names[attention])
        tokens = torch.randint(0, 7, (3, 2 * SPEC.seq_len))
        out = model(tokens)
        assert out.shape == (3, 2 * SPEC.seq_len, SPEC.num_classes) and bool(out.isfinite().all())
    assert names["vanilla"] == names["fpsa"]
    learned = [n for n, _ in build_model(config("vanilla", "learned"), SPEC).named_parameters()]
    assert sorted(set(learned) - set(names["vanilla"])) == ["pos.weight"]


def test_sinusoidal_is_an_option_of_the_dtrain_family_only():
    with pytest.raises(ValueError, match="positions"):
        Config.model_validate({"model": {"family": "hf-bert", "positions": "sinusoidal"}})
