"""dtrain.distributed's control collectives without peers: identities at world size 1, and the device each
backend needs its tensors on."""

from __future__ import annotations

import pytest
import torch

from dtrain import distributed
from dtrain.distributed import (
    all_gather_objects,
    all_ranks_agree,
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    broadcast_,
    group_world_size,
)


def test_without_peers_every_collective_is_the_identity():
    assert group_world_size() == 1
    t = torch.tensor([1.5, -2.0])
    for collective in (all_reduce_sum, all_reduce_max, all_reduce_min, lambda x: broadcast_(x, src=0)):
        assert collective(t) is t and t.tolist() == [1.5, -2.0]
    obj = {"rows": torch.ones(2, 4)}
    assert all_gather_objects(obj) == [obj]
    assert barrier() is None
    assert all_ranks_agree(True) is True and all_ranks_agree(False) is False


@pytest.mark.parametrize(
    "config, expected",
    [
        ("cpu:gloo,cuda:gloo", "cpu"),  # backend "gloo"
        ("cpu:gloo,cuda:nccl", "cpu"),  # gloo takes the CPU tensors, nccl the CUDA ones
        ("cuda:nccl", "cuda:0"),  # backend "nccl"
        ("cuda:gloo", "cuda:0"),  # gloo, but registered for CUDA tensors only
    ],
)
def test_collective_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch, config: str, expected: str):
    monkeypatch.setattr(distributed.dist, "get_backend_config", lambda group=None: config)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.collective_device() == torch.device(expected)


def test_comm_keeps_its_row_counts_where_a_cuda_only_backend_takes_tensors(monkeypatch: pytest.MonkeyPatch):
    """Comm's small host-side tensors (the row-count exchange) follow the same rule as the control collectives:
    under "cuda:gloo" (or NCCL) they must be CUDA tensors; a CPU tensor would be refused by the backend."""
    from dtrain.compression.comm import Comm

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(distributed.dist, "get_backend_config", lambda group=None: "cuda:gloo")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert Comm().device == torch.device("cuda", 0)
    monkeypatch.setattr(distributed.dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:gloo")
    assert Comm().device == torch.device("cpu")
