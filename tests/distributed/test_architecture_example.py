"""The example codec of docs/architecture.md on 2 gloo ranks: the same update as allreduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtrain.compression import build_strategy
from dtrain.config import CommConfig
from tests.helpers.models import ToyEncoder, toy_batch
from tests.helpers.ranks import run_ranks
from tests.unit.test_architecture_example import example_namespace


def _train(rank: int, world: int, use_example: bool) -> dict:
    torch.manual_seed(0)
    model = ToyEncoder()
    options = CommConfig(strategy="dad").options()
    strategy = example_namespace()["build_dense"](options) if use_example else build_strategy(CommConfig())
    fwd = strategy.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        tokens, labels = toy_batch(step, 8, rank, world)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(tokens), labels).backward()
        strategy.synchronize()
        opt.step()
    strategy.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_documented_codec_on_two_ranks_equals_allreduce():
    example = run_ranks(_train, 2, True)
    reference = run_ranks(_train, 2, False)
    assert example[0].keys() == reference[0].keys()
    for name in example[0]:
        torch.testing.assert_close(example[0][name], example[1][name], rtol=0, atol=0)  # replicas identical
        torch.testing.assert_close(example[0][name], reference[0][name], rtol=1e-6, atol=1e-7, msg=name)
