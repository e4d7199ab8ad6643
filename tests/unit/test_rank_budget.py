"""The rank budget's allocation rule (dtrain/compression/ranks.py), without a process group."""

from __future__ import annotations

import pytest
import torch

from dtrain.compression.ranks import LayerCost, allocate


def test_without_a_spectrum_every_layer_gets_the_largest_common_rank_that_fits():
    layers = [LayerCost("a", 64, 100.0), LayerCost("b", 3, 10.0)]
    assert allocate(layers, 500, {}) == {"a": 4, "b": 3}  # b stops at its k_max, a at 4 x 100 + 3 x 10 <= 500
    assert allocate(layers, 110, {}) == {"a": 1, "b": 1}


def test_ranks_go_where_the_next_singular_value_buys_the_most_per_byte():
    layers = [LayerCost("a", 64, 100.0), LayerCost("b", 64, 10.0)]
    spectra = {"a": torch.tensor([10.0, 9.0, 8.0, 1.0]), "b": torch.tensor([1.0, 0.5, 0.1])}
    ranks = allocate(layers, 500, spectra)
    # a's σ2², σ3² (81, 64 per 100 B) beat b's σ2² (0.25 per 10 B); b's cheap columns then fill the rest
    assert ranks == {"a": 4, "b": 10}
    assert sum(c.bytes_per_rank * ranks[c.name] for c in layers) <= 500
    assert sum(c.bytes_per_rank * ranks[c.name] for c in layers) <= 500
    assert allocate(list(reversed(layers)), 500, spectra) == ranks  # the order of the layers does not matter


def test_a_budget_below_one_rank_per_layer_is_refused():
    with pytest.raises(ValueError, match="one rank per layer needs 110 B/step"):
        allocate([LayerCost("a", 4, 100.0), LayerCost("b", 4, 10.0)], 50, {})


def test_a_layer_at_most_doubles_its_rank_per_replan():
    layers = [LayerCost("a", 64, 10.0), LayerCost("b", 64, 10.0)]
    flat = {"a": torch.ones(4), "b": torch.full((4,), 0.01)}  # a's flat spectrum would take everything
    ranks = allocate(layers, 1000, flat, previous={"a": 2, "b": 2})
    assert ranks["a"] == 5  # 2 x 2 + 1
    assert ranks["b"] <= 5


def test_a_rank_that_puts_nothing_on_a_wire_is_free():
    """World size 1 (a job that re-formed on one node): no factor crosses a link, so every layer takes its cap."""
    layers = [LayerCost("a", 16, 0.0), LayerCost("b", 2, 0.0)]
    spectra = {"a": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([1.0])}
    assert allocate(layers, 100, spectra) == {"a": 16, "b": 2}
    assert allocate(layers, 100, spectra, previous={"a": 3, "b": 1}) == {"a": 7, "b": 2}  # growth still bounded


def test_a_resumed_budget_plan_keeps_its_ranks_and_the_spectra_it_replans_from():
    from dtrain.compression.codecs.factors import FactorsCodec
    from dtrain.compression.plan import BudgetPlan
    from dtrain.config import CommConfig

    options = CommConfig(strategy="rankdad", budget_bytes=1e5).options()

    def plan() -> BudgetPlan:
        return BudgetPlan(FactorsCodec(options), options, 2, captures=lambda: [], fixed=lambda: 0.0)

    saved = plan()
    assert not saved.ready and saved.state_dict()["budget_ranks"] is None
    saved._ranks.per_layer = {"up": 3}
    saved._ranks.observe("up", torch.tensor([2.0, 1.0]))
    resumed = plan()
    resumed.load_state_dict(saved.state_dict())
    assert resumed.ready and resumed._ranks.per_layer == {"up": 3}
    assert torch.equal(resumed._ranks.spectra["up"], saved._ranks.spectra["up"])
