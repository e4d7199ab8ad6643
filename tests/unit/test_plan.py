"""auto's cost model (dtrain/compression/plan.py) on one process: which method each layer gets."""

from __future__ import annotations

from dtrain.compression.codecs.factors import FactorsCodec
from dtrain.compression.codecs.rows import RowsCodec
from dtrain.compression.plan import choose_method, layer_costs
from dtrain.config import CommConfig


def test_auto_cost_model_picks_each_method_where_it_pays():
    def pick(i, o, n, s=4, k=4, rate=2.0):
        codecs = [RowsCodec(), FactorsCodec(CommConfig(strategy="rankdad", rank=k).options())]
        return choose_method(layer_costs(codecs, i, o, n, s), rate)

    assert pick(784, 512, n=32, k=32) == "dad"  # N(in+out) ≪ in·out, and k = N rows compress nothing
    assert pick(784, 512, n=32, k=4) == "rankdad"  # the same layer, 8× fewer pseudo-rows
    assert pick(512, 512, n=4096) == "rankdad"  # k(in+out) far below in·out, N large
    assert pick(16, 5, n=4096) == "allreduce"  # tiny layer: its gradient is smaller than anything else
    assert pick(512, 512, n=4096, k=128) == "allreduce"  # k(in+out) not min_compression_rate below in·out
    assert pick(512, 512, n=4096, s=1) == "allreduce"  # one rank: nothing travels, stay exact


def test_auto_weighs_both_factor_forms_by_their_wire_bytes_at_the_world_size():
    from dtrain.compression.codecs.subspace import SubspaceCodec

    options = CommConfig(strategy="auto", rank=4).options()
    codecs = [RowsCodec(), FactorsCodec(options), SubspaceCodec(options)]

    def costs(s):
        return layer_costs(codecs, 512, 512, 4096, s)

    # the all-gather grows as (S−1) × payload, the all-reduce form stays at 2(S−1)/S × payload
    payload = 4 * (512 + 512) * 4
    for s in (2, 4, 8, 16):
        assert costs(s)["rankdad"] == (s - 1) * payload
        assert costs(s)["rankdad-allreduce"] == 2 * (s - 1) / s * payload
    assert choose_method(costs(2), 2.0) == "rankdad"  # equal bytes at S = 2: one round trip beats two
    assert choose_method(costs(4), 2.0) == "rankdad-allreduce"
    assert choose_method(costs(16), 2.0) == "rankdad-allreduce"


def test_with_a_link_rate_auto_weighs_latency_and_bytes():
    from dtrain.compression.codecs.subspace import SubspaceCodec
    from dtrain.compression.plan import layer_seconds
    from dtrain.config import link_bytes_per_s

    options = CommConfig(strategy="auto", rank=4, link_rate="100mbit").options()
    codecs = [RowsCodec(), FactorsCodec(options), SubspaceCodec(options)]
    costs = layer_costs(codecs, 64, 64, 4096, 16)  # a small layer at S = 16
    seconds = layer_seconds(codecs, costs, 16, link_bytes_per_s("100mbit"), 50e-6)
    # bytes alone favour the all-reduce form (2(S-1)/S vs S-1) ...
    assert choose_method(costs, 1.0) == "rankdad-allreduce"
    # ... but its 2 x 2(S-1) sequential ring steps cost more latency than the bytes it saves on this layer
    assert seconds["rankdad-allreduce"] == 4 * 15 * 50e-6 + costs["rankdad-allreduce"] / 12.5e6
    assert seconds["rankdad"] == 15 * 50e-6 + costs["rankdad"] / 12.5e6
    assert choose_method(seconds, 1.0) == "rankdad"


def test_a_plan_resumed_at_another_world_size_is_made_again():
    from dtrain.compression.plan import CostModelPlan

    options = CommConfig(strategy="auto", rank=4).options()

    def plan(world):
        return CostModelPlan(RowsCodec(), [FactorsCodec(options)], options, world, True, lambda: [], lambda _: None)

    saved = plan(4)
    saved.plan = {"up": {"method": "rankdad"}}
    same, other = plan(4), plan(8)
    same.load_state_dict(saved.state_dict())
    other.load_state_dict(saved.state_dict())
    assert same.plan == saved.plan and other.plan is None  # every cost depends on S: plan again at S = 8
