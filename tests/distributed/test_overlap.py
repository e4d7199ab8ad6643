"""dad / rankdad / auto with `comm.overlap` (collectives started during backward) and `comm.rest_dtype`
(16-bit uncaptured gradients with error feedback), on real gloo processes."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks
from dtrain.compression import build_strategy
from dtrain.config import CommConfig, ConfigError, config_from_dict
from toy_models import ToyEncoder, toy_batch

GLOBAL_BATCH = 16
STEPS = 6
CONFIGS = {
    "dad": dict(strategy="dad"),
    "rankdad-oneway": dict(strategy="rankdad", rank=2),
    "rankdad-twoway-fp16": dict(strategy="rankdad", rank=2, rankdad_mode="twoway", factor_dtype="fp16"),
    "auto": dict(strategy="auto", rank=2),
    "rankdad-rest-bf16": dict(strategy="rankdad", rank=2, rest_dtype="bf16"),
    "auto-rest-fp16": dict(strategy="auto", rank=2, rest_dtype="fp16"),
}


def _train(fields: dict, rank: int, world: int, overlap: bool) -> dict:
    torch.manual_seed(0)
    model = ToyEncoder()
    strategy = build_strategy(CommConfig(**fields, overlap=overlap))
    fwd = strategy.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out: dict = {"bytes": [], "early": []}
    for step in range(STEPS):
        tokens, labels = toy_batch(step, GLOBAL_BATCH, rank, world)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(tokens), labels).backward()
        out["bytes"].append(strategy.synchronize().bytes_sent)
        out["early"].append(strategy.scheduler.last_round.layers_in_backward if overlap else 0.0)
        opt.step()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["state"] = sorted(strategy.state_dict())
    strategy.close()
    return out


def _accumulate(rank: int, world: int) -> dict:
    """Two micro-batches: the first backward inside no_sync(); and the same without no_sync (must refuse)."""
    res = {}
    for use_no_sync in (True, False):
        torch.manual_seed(0)
        model = ToyEncoder()
        strategy = build_strategy(CommConfig(strategy="dad"))
        fwd = strategy.attach(model)
        batches = [toy_batch(s, GLOBAL_BATCH, rank, world) for s in (0, 1)]
        try:
            if use_no_sync:
                with strategy.no_sync():
                    F.cross_entropy(fwd(batches[0][0]), batches[0][1]).backward()
            else:
                F.cross_entropy(fwd(batches[0][0]), batches[0][1]).backward()
            F.cross_entropy(fwd(batches[1][0]), batches[1][1]).backward()
            strategy.synchronize()
            res[use_no_sync] = {n: p.grad.clone() for n, p in model.named_parameters()}
        except RuntimeError as err:
            res[use_no_sync] = str(err)
    return res


def _worker(rank: int, world: int) -> dict:
    out = {name: {mode: _train(fields, rank, world, mode) for mode in (True, False)}
           for name, fields in CONFIGS.items()}
    out["accumulate"] = _accumulate(rank, world)
    return out


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return run_ranks(_worker, world)


WORLDS = pytest.mark.parametrize("world", [2, 4])


@WORLDS
@pytest.mark.parametrize("config", list(CONFIGS))
def test_overlap_changes_no_bit_and_no_byte_and_starts_layers_during_backward(world, config):
    results = _results(world)
    for res in results:
        on, off = res[config][True], res[config][False]
        assert on["bytes"] == off["bytes"]
        for name, p in off["params"].items():
            assert torch.equal(on["params"][name], p), name
            assert torch.equal(results[0][config][True]["params"][name], on["params"][name]), name
        # every captured layer goes out during backward (auto: from step 2, once its plan is made)
        first = 1 if config.startswith("auto") else 0
        assert all(e >= 2 for e in on["early"][first:]), on["early"]


@WORLDS
def test_rest_in_16_bits_halves_its_bytes_and_keeps_a_residual(world):
    res = _results(world)[0]
    model = ToyEncoder()
    rest = sum(p.numel() for n, p in model.named_parameters()
               if n not in ("up.weight", "down.weight", "head.weight"))
    fp32 = _results(world)[0]["rankdad-oneway"][True]["bytes"][0]
    bf16 = res["rankdad-rest-bf16"][True]["bytes"][0]
    assert fp32 - bf16 == 2 * rest
    assert "rest_residual" in res["rankdad-rest-bf16"][True]["state"]
    assert "rest_residual" in res["auto-rest-fp16"][True]["state"]


def test_accumulation_with_overlap_is_exact_inside_no_sync_and_refused_without():
    world = 2
    results = _results(world)
    torch.manual_seed(0)
    model = ToyEncoder()
    for s in (0, 1):
        tokens, labels = toy_batch(s, GLOBAL_BATCH, 0, 1)
        F.cross_entropy(model(tokens), labels).backward()
    # each rank's loss is the mean over its half: the mean over ranks of the sum of two micro-batches
    for res in results:
        grads = res["accumulate"][True]
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)
        assert "no_sync" in res["accumulate"][False]


def test_rest_dtype_is_refused_for_strategies_that_do_not_split_the_rest():
    with pytest.raises(ConfigError, match="rest_dtype"):
        config_from_dict({"comm": {"strategy": "powersgd", "rest_dtype": "bf16"}})
