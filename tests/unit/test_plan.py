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
