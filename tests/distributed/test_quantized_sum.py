"""`Comm.all_reduce_quantized_async` (an 8-bit sum over ranks) on real gloo processes, 1 to 4 ranks (3: a world
size that is no power of two), against the exact fp32 sum of what every rank passed in."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dtrain.compression.comm import Comm
from dtrain.compression.dtypes import quantized_layout, quantized_sum_bytes
from tests.helpers.ranks import cached, run_ranks

# a length that is no multiple of a chunk (padding), values over six decades and a run of zeros
NUMEL = 1000
#: what one encoding may lose, relative to the largest value of its block: half a step of int8, an e4m3 step
ENCODING_ERROR = {"int8": 0.5 / 127, "fp8": 1 / 16}


def _tensor(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    t = torch.randn(NUMEL, generator=g) * torch.logspace(-3, 3, NUMEL)
    t[100:300] = 0.0
    return t


def _sum(rank: int, world: int, fmt: str) -> dict:
    comm = Comm()
    handle = comm.all_reduce_quantized_async(_tensor(rank), "test/sum", fmt, {"a": 600, "b": 400})
    total, delivered = handle.wait(), handle.delivered()
    again = handle.wait()
    tiny = comm.all_reduce_quantized_async(torch.full((3,), float(rank + 1)), "test/tiny", fmt).wait()
    # two sums in flight, waited in the other order (as the overlap scheduler may): each its own sum
    first = comm.all_reduce_quantized_async(torch.full((200,), float(rank)), "test/first", fmt)
    second = comm.all_reduce_quantized_async(torch.full((50,), 2.0 * rank), "test/second", fmt)
    crossed = (second.wait().clone(), first.wait().clone())
    return {
        "sum": total,
        "again": again,
        "delivered": delivered,
        "tiny": tiny,
        "crossed": crossed,
        "stats": dataclasses.asdict(comm.reset()),
    }


@cached
def _run(fmt: str, world: int) -> list[dict]:
    return run_ranks(_sum, world, fmt)


WORLDS = pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"world{w}")
FORMATS = pytest.mark.parametrize("fmt", ["int8", "fp8"])


@WORLDS
@FORMATS
def test_every_rank_gets_the_same_sum_within_two_encodings_of_the_exact_one(world, fmt):
    runs = _run(fmt, world)
    exact = sum(_tensor(r) for r in range(world))
    for res in runs:
        assert torch.equal(res["sum"], runs[0]["sum"])  # bitwise: every rank decodes the same bytes
        assert torch.equal(res["again"], res["sum"])  # wait() twice: the same sum, charged once
    # each block (all of one size, from the tensor's start): every rank's first encoding, then the sum's
    per_chunk, size = quantized_layout(NUMEL, world)
    blocks = world * per_chunk
    padded = torch.zeros(blocks * size)
    bound = torch.zeros(blocks)
    for r in range(world):
        padded[:NUMEL] = _tensor(r).abs()
        bound += padded.view(blocks, size).amax(dim=1)
    padded[:NUMEL] = exact.abs()
    bound = (bound + 1.01 * padded.view(blocks, size).amax(dim=1)) * ENCODING_ERROR[fmt]
    error = torch.zeros(blocks * size)
    error[:NUMEL] = (runs[0]["sum"] - exact).abs()
    assert (error.view(blocks, size).amax(dim=1) <= bound * 1.001).all()
    assert torch.equal(runs[0]["sum"][100:300], torch.zeros(200))  # zeros stay zeros
    assert torch.allclose(runs[0]["tiny"], torch.full((3,), world * (world + 1) / 2), rtol=ENCODING_ERROR[fmt] * 2)
    ranks = world * (world - 1) / 2  # Σ rank
    second, first = runs[0]["crossed"]
    assert torch.allclose(first, torch.full((200,), ranks)) and torch.allclose(second, torch.full((50,), 2 * ranks))


@WORLDS
@FORMATS
def test_the_delivered_shares_add_up_to_the_sum(world, fmt):
    """What error feedback relies on: each rank's share is its tensor plus its own encodings' losses."""
    runs = _run(fmt, world)
    shares = sum(res["delivered"] for res in runs)
    total = runs[0]["sum"]
    assert ((shares - total).abs().max() / total.abs().max()).item() < 1e-6
    if world > 1:  # and the losses are real: a share is not the tensor itself
        assert not torch.equal(runs[0]["delivered"], _tensor(0))


@WORLDS
def test_bytes_are_the_padded_8_bit_payload_and_a_ring_s_share_on_the_wire(world):
    for res in _run("int8", world):
        s = res["stats"]
        # S chunks of ⌈1000 / S⌉ values in the fewest equal blocks of ≤ 128 values, each + a 4-byte scale: S = 3
        # has chunks of 334 values in 3 blocks of 112, the others 1000 / S values in blocks of 125
        main = {1: 8 * 129, 2: 2 * 4 * 129, 3: 3 * 3 * 116, 4: 4 * 2 * 129}[world]
        payload = main + {1: 3 + 4, 2: 2 * (2 + 4), 3: 3 * (1 + 4), 4: 4 * (1 + 4)}[world]  # the 3-value tensor
        payload += quantized_sum_bytes("int8", 200, world) + quantized_sum_bytes("int8", 50, world)
        assert quantized_sum_bytes("int8", NUMEL, world) == main
        assert s["bytes_sent"] == s["bytes_recv"] == payload
        assert s["wire_bytes"] == pytest.approx(2 * (world - 1) / world * payload)
        assert s["per_layer"]["a"] + s["per_layer"]["b"] == main  # split by values, the padding to the last
        assert s["per_layer"]["a"] == main * 600 // NUMEL
