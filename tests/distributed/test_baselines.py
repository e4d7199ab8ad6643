"""Baseline strategies (allreduce, ddp, ddp-powersgd, powersgd) on real gloo processes, 2 and 4 ranks, against
exact oracles: the single-process gradient of the whole global batch, closed-form byte counts, torch's own
PowerSGD statistics.

Each scenario (one strategy's one step, its training run, a resume, no_sync, missing gradients, the full-rank
power iteration) runs on its own spawned ranks, once per world size: the tests that read it share the run, and a
scenario that fails fails only its own tests, whose ids name it."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dtrain.compression import build_strategy
from dtrain.compression.comm import Comm
from dtrain.compression.powersgd import MatrixPlan, initial_factor, power_iteration_mean, quantized_sum
from dtrain.config import CommConfig
from tests.helpers.models import seeded_encoder, toy_batch
from tests.helpers.oracles import assert_close, assert_same_on_all_ranks, local_grads, oracle_grads, rel
from tests.helpers.ranks import cached, run_ranks

GLOBAL_BATCH = 8
STEPS = 20
RANK = 2
START = 2
SMALL_BUCKETS_MB = 0.001  # 1048 bytes: ToyEncoder's parameters spread over several buckets
RESUME_AT, RESUMED_STEPS = 4, 7
FULL_RANK_SHAPES = [(6, 9), (9, 6), (5, 5)]

TRAINED = {
    "allreduce": dict(strategy="allreduce", bucket_mb=SMALL_BUCKETS_MB),
    "ddp": dict(strategy="ddp"),
    "ddp-powersgd": dict(strategy="ddp-powersgd", rank=RANK, start_step=START),
    "powersgd": dict(strategy="powersgd", rank=RANK, start_step=START),
    "powersgd-bf16": dict(strategy="powersgd", rank=RANK, start_step=START, factor_dtype="bf16"),
    "powersgd-rank1-fp16": dict(strategy="powersgd", rank=1, start_step=START, factor_dtype="fp16"),
    "powersgd-int8": dict(strategy="powersgd", rank=RANK, start_step=START, factor_dtype="int8"),
}
# one step from a fresh strategy; powersgd-full-rank is restored past its warm-up (start_step) first
ONE_STEP = {
    "allreduce": (TRAINED["allreduce"], None),
    "ddp": (TRAINED["ddp"], None),
    "ddp-powersgd": (TRAINED["ddp-powersgd"], None),
    "powersgd-full-rank": (dict(strategy="powersgd", rank=64), {"step": START, "residuals": {}, "factors": {}}),
}


# --------------------------------------------------------------------------------------- on every rank
def _backward(fwd: torch.nn.Module, step: int, rank: int, world: int) -> None:
    tokens, labels = toy_batch(step, GLOBAL_BATCH, rank, world)
    F.cross_entropy(fwd(tokens), labels).backward()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _one_step(rank: int, world: int, cfg: dict, state: dict | None = None) -> dict[str, Any]:
    model = seeded_encoder()
    strategy = build_strategy(CommConfig(**cfg))
    fwd = strategy.attach(model)
    if state is not None:
        strategy.load_state_dict(state)
    _backward(fwd, 0, rank, world)
    stats = strategy.synchronize()
    return {"grads": _grads(model), "stats": dataclasses.asdict(stats), "describe": strategy.describe()}


def _missing_grads(rank: int, world: int) -> dict[str, Any]:
    """allreduce when a gradient is None: head.bias on rank 0 only, norm.bias on every rank."""
    model = seeded_encoder()
    strategy = build_strategy(CommConfig(**TRAINED["allreduce"]))
    fwd = strategy.attach(model)
    _backward(fwd, 0, rank, world)
    model.norm.bias.grad = None
    if rank == 0:
        model.head.bias.grad = None
    stats = strategy.synchronize()
    return {"grads": _grads(model), "stats": dataclasses.asdict(stats)}


def _train(model, strategy, fwd, opt, steps: range, rank: int, world: int) -> list[dict]:
    stats = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        _backward(fwd, step, rank, world)
        stats.append(dataclasses.asdict(strategy.synchronize()))
        opt.step()
    return stats


def _trained(rank: int, world: int, cfg: dict, steps: int = STEPS) -> dict[str, Any]:
    model = seeded_encoder()
    strategy = build_strategy(CommConfig(**cfg))
    fwd = strategy.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = _train(model, strategy, fwd, opt, range(steps), rank, world)
    out = {"stats": stats, "params": _params(model), "grads": _grads(model), "describe": strategy.describe()}
    if cfg["strategy"] == "ddp-powersgd":
        out["torch_compression_stats"] = strategy.hook.state.compression_stats()
    return out


def _resumed(rank: int, world: int, cfg: dict, stop: int, steps: int) -> dict[str, Any]:
    """Train to `stop`, rebuild model, optimizer and strategy from their state dicts, train on to `steps`."""
    model = seeded_encoder()
    strategy = build_strategy(CommConfig(**cfg))
    fwd = strategy.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, strategy, fwd, opt, range(stop), rank, world)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "strategy": strategy.state_dict()})

    model = seeded_encoder()
    model.load_state_dict(saved["model"])
    strategy = build_strategy(CommConfig(**cfg))
    fwd = strategy.attach(model)
    strategy.load_state_dict(saved["strategy"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(saved["opt"])
    stats = _train(model, strategy, fwd, opt, range(stop, steps), rank, world)
    return {"stats": stats, "params": _params(model), "state": strategy.state_dict()}


def _ddp_no_sync(rank: int, world: int) -> dict[str, Any]:
    """Gradient accumulation: a backward inside no_sync() sends nothing and keeps the local gradient."""
    model = seeded_encoder()
    strategy = build_strategy(CommConfig(strategy="ddp"))
    fwd = strategy.attach(model)
    with strategy.no_sync():
        _backward(fwd, 0, rank, world)
    skipped = dataclasses.asdict(strategy.synchronize())
    local = _grads(model)
    _backward(fwd, 1, rank, world)
    synced = dataclasses.asdict(strategy.synchronize())
    return {"skipped": skipped, "local": local, "synced": synced, "accumulated": _grads(model)}


def _full_rank_power_iteration(rank: int, world: int, fmt: str = "fp32") -> dict[str, Any]:
    """The compressor itself at r = min(n, m), cold start, one step: P Pᵀ is the identity on the column space
    of the mean, so the result is the exact mean (8-bit factors: to their precision)."""
    per_rank = [
        [
            torch.randn(n, m, generator=torch.Generator().manual_seed(100 * r + i))
            for i, (n, m) in enumerate(FULL_RANK_SHAPES)
        ]
        for r in range(world)
    ]
    plans = [MatrixPlan(f"m{i}", n, m, min(n, m)) for i, (n, m) in enumerate(FULL_RANK_SHAPES)]
    comm = Comm()
    sum_ = comm.all_reduce_ if fmt == "fp32" else quantized_sum(comm, fmt)
    approx, _ = power_iteration_mean(
        per_rank[rank], initial_factor(plans, 0, torch.float32), plans, sum_, comm.world_size, torch.float32
    )
    mean = [sum(ms) / world for ms in zip(*per_rank)]
    return {"approx": approx, "mean": mean, "stats": dataclasses.asdict(comm.reset())}


def _resume(name: str) -> Callable[[int, int], dict[str, Any]]:
    def run(rank: int, world: int) -> dict[str, Any]:
        out = {"resumed": _resumed(rank, world, TRAINED[name], stop=RESUME_AT, steps=RESUMED_STEPS)}
        if name == "powersgd":  # the oracle of a bitwise resume: the same training, never interrupted
            out["uninterrupted"] = _trained(rank, world, TRAINED[name], steps=RESUMED_STEPS)
        return out

    return run


SCENARIOS: dict[str, Callable[[int, int], Any]] = {
    **{
        f"one-step-{name}": (lambda rank, world, name=name: _one_step(rank, world, *ONE_STEP[name]))
        for name in ONE_STEP
    },
    **{f"trained-{name}": (lambda rank, world, name=name: _trained(rank, world, TRAINED[name])) for name in TRAINED},
    "resume-powersgd": _resume("powersgd"),
    "resume-ddp-powersgd": _resume("ddp-powersgd"),
    "ddp-no-sync": _ddp_no_sync,
    "missing-grads": _missing_grads,
    "full-rank-power-iteration": _full_rank_power_iteration,
    "full-rank-power-iteration-int8": lambda rank, world: _full_rank_power_iteration(rank, world, "int8"),
}


def _scenario(rank: int, world: int, name: str) -> Any:
    return SCENARIOS[name](rank, world)


@cached
def _run(name: str, world: int) -> list[Any]:
    return run_ranks(_scenario, world, name)


# --------------------------------------------------------------------------------------- in the test process
WORLDS = pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"world{w}")


def _numels() -> dict[str, int]:
    return {n: p.numel() for n, p in seeded_encoder().named_parameters()}


def _powersgd_bytes(rank: int, factor_bytes: int, min_rate: float = 2.0) -> dict[str, int]:
    """Closed form per parameter: (n + m) r x factor size for a matrix where (n + m) r x rate < n m (the matrix
    view is (shape[0], numel / shape[0]), r = min(n, m, rank)); numel x 4 for everything else."""
    out = {}
    for name, p in seeded_encoder().named_parameters():
        out[name] = p.numel() * 4
        if p.dim() >= 2:
            n, m = p.shape[0], p.numel() // p.shape[0]
            r = min(n, m, rank)
            if (n + m) * r * min_rate < n * m:
                out[name] = (n + m) * r * factor_bytes
    return out


def _assert_bytes(stats: dict, per_layer: dict[str, int], world: int) -> None:
    total = sum(per_layer.values())
    assert stats["per_layer"] == per_layer
    assert stats["bytes_sent"] == total and stats["bytes_recv"] == total
    assert stats["wire_bytes"] == pytest.approx(2 * (world - 1) / world * total, rel=1e-12)


# --------------------------------------------------------------------------------------- exactness
@WORLDS
@pytest.mark.parametrize("name", list(ONE_STEP))
def test_one_step_delivers_the_global_batch_gradient(world, name):
    """ddp-powersgd's first step is a plain all-reduce (start_step); powersgd at rank >= min(n, m) sends every
    matrix raw, because a full-rank factorisation never passes (n + m) r x rate < n m."""
    results = _run(f"one-step-{name}", world)
    oracle = oracle_grads(GLOBAL_BATCH)
    for res in results:
        assert_close(res["grads"], oracle)
    assert_same_on_all_ranks([res["grads"] for res in results])


@WORLDS
def test_allreduce_counts_a_missing_gradient_as_zero(world):
    results = _run("missing-grads", world)
    want = oracle_grads(GLOBAL_BATCH)
    want["norm.bias"] = torch.zeros_like(want["norm.bias"])
    want["head.bias"] = sum(local_grads(GLOBAL_BATCH, r, world)["head.bias"] for r in range(1, world)) / world
    for res in results:
        assert_close(res["grads"], want)
        _assert_bytes(res["stats"], {n: k * 4 for n, k in _numels().items()}, world)
    assert_same_on_all_ranks([res["grads"] for res in results])


@WORLDS
def test_ddp_equals_allreduce(world):
    for ddp, allreduce in zip(_run("one-step-ddp", world), _run("one-step-allreduce", world)):
        assert_close(ddp["grads"], allreduce["grads"])


@WORLDS
def test_full_rank_power_iteration_is_the_exact_mean(world):
    results = _run("full-rank-power-iteration", world)
    for out in results:
        for got, want in zip(out["approx"], out["mean"]):
            assert rel(got, want) <= 1e-5
        assert out["stats"]["bytes_sent"] == sum((n + m) * min(n, m) * 4 for n, m in FULL_RANK_SHAPES)
    assert_same_on_all_ranks([dict(enumerate(res["approx"])) for res in results])


@WORLDS
def test_full_rank_power_iteration_with_8_bit_factors_is_the_mean_to_their_precision(world):
    """P's rounding changes no span at full rank; Q's sum is S + 1 encodings of at most half an int8 step (1/254
    of a block's largest) each, allowing entries 4× below their block's largest (a misplaced factor: off by ~1)."""
    results = _run("full-rank-power-iteration-int8", world)
    for out in results:
        for got, want in zip(out["approx"], out["mean"]):
            assert 1e-6 < rel(got, want) < (world + 1) * 4 / 254
    assert_same_on_all_ranks([dict(enumerate(res["approx"])) for res in results])


@WORLDS
@pytest.mark.parametrize("name", list(TRAINED))
def test_replicas_stay_bitwise_identical(world, name):
    results = _run(f"trained-{name}", world)
    assert_same_on_all_ranks([res["params"] for res in results])
    assert_same_on_all_ranks([res["grads"] for res in results])


@WORLDS
def test_ddp_no_sync_sends_nothing_and_keeps_local_gradients(world):
    results = _run("ddp-no-sync", world)
    for out in results:
        assert out["skipped"]["bytes_sent"] == 0 and out["skipped"]["per_layer"] == {}
        _assert_bytes(out["synced"], {n: k * 4 for n, k in _numels().items()}, world)
    local = [res["local"] for res in results]
    assert all(rel(local[0]["head.bias"], other["head.bias"]) > 1e-3 for other in local[1:])
    # the synced backward reduces the accumulated sum: the full-batch gradients of both batches, added
    both = oracle_grads(GLOBAL_BATCH, steps=(0, 1))
    for res in results:
        assert_close(res["accumulated"], both)


# --------------------------------------------------------------------------------------- bytes
@WORLDS
@pytest.mark.parametrize("name", ["allreduce", "ddp"])
def test_exact_strategies_send_every_gradient_once_in_fp32(world, name):
    per_layer = {n: k * 4 for n, k in _numels().items()}
    for res in _run(f"trained-{name}", world):
        for stats in res["stats"]:
            _assert_bytes(stats, per_layer, world)


@WORLDS
def test_allreduce_buckets_respect_the_cap_and_charge_each_parameter(world):
    numels = _numels()
    out = _run("one-step-allreduce", world)[0]
    buckets = out["describe"]["buckets"]
    assert len(buckets) > 1 and [n for b in buckets for n in b] == list(numels)
    cap = int(SMALL_BUCKETS_MB * 2**20)
    assert all(len(b) == 1 or sum(numels[n] for n in b) * 4 <= cap for b in buckets)
    assert set(out["stats"]["per_layer"]) == set(numels)


@WORLDS
@pytest.mark.parametrize(
    "name,factor_bytes,rank",
    [("powersgd", 4, RANK), ("powersgd-bf16", 2, RANK), ("powersgd-rank1-fp16", 2, 1), ("ddp-powersgd", 4, RANK)],
)
def test_powersgd_bytes_follow_the_closed_form(world, name, factor_bytes, rank):
    dense = {n: k * 4 for n, k in _numels().items()}
    compressed = _powersgd_bytes(rank, factor_bytes)
    assert sum(compressed.values()) < sum(dense.values())
    for res in _run(f"trained-{name}", world):
        for step, s in enumerate(res["stats"]):
            _assert_bytes(s, dense if step < START else compressed, world)


@WORLDS
def test_powersgd_with_8_bit_factors_sends_two_quantized_sums(world):
    """P (all compressed matrices' rows × r) and Q (cols × r) each go in one 8-bit sum, each block of values with
    one fp32 scale; what is not compressed goes raw in fp32."""
    fp32 = _powersgd_bytes(RANK, 4)
    dense = {n: k * 4 for n, k in _numels().items()}
    compressed = [n for n in fp32 if fp32[n] != dense[n]]
    shapes = {n: p.shape for n, p in seeded_encoder().named_parameters()}

    def quantized(numel: int) -> int:  # S chunks of ⌈numel / S⌉ values in the fewest equal blocks of ≤ 128
        chunk = -(-numel // world)
        blocks = -(-chunk // 128)
        return world * blocks * (-(-chunk // blocks) + 4)

    p_numel = sum(shapes[n][0] * min(RANK, *shapes[n]) for n in compressed)
    q_numel = sum(shapes[n][1] * min(RANK, *shapes[n]) for n in compressed)
    expected = sum(v for n, v in dense.items() if n not in compressed) + quantized(p_numel) + quantized(q_numel)
    for res in _run("trained-powersgd-int8", world):
        assert res["describe"]["bytes_per_step_compressed"] == expected  # the strategy's own closed form
        for s in res["stats"][START:]:
            assert s["bytes_sent"] == expected
            assert s["wire_bytes"] == pytest.approx(2 * (world - 1) / world * expected)
            assert sum(s["per_layer"].values()) == expected and set(s["per_layer"]) == set(dense)


@WORLDS
def test_powersgd_compresses_what_torch_compresses(world):
    """Element counts per compressed step: ours (fp32 bytes / 4) against torch's PowerSGDState.compression_stats()
    for the same model and settings, accumulated over the STEPS - START compressed steps."""
    for theirs, ours in zip(_run("trained-ddp-powersgd", world), _run("trained-powersgd", world)):
        _, before, after = theirs["torch_compression_stats"]
        assert before == (STEPS - START) * sum(_numels().values())
        assert after == sum(s["bytes_sent"] // 4 for s in ours["stats"][START:])
        assert after < before


@WORLDS
def test_compression_changes_the_gradient(world):
    """Guards the tests above against a powersgd that silently sends raw: after START, delivered gradients
    are rank-2 approximations, so training departs from the exact run."""
    exact = _run("trained-allreduce", world)[0]["params"]
    for name in ("powersgd", "ddp-powersgd"):
        assert rel(_run(f"trained-{name}", world)[0]["params"]["up.weight"], exact["up.weight"]) > 1e-4


# --------------------------------------------------------------------------------------- checkpoints
@WORLDS
def test_powersgd_resumes_bitwise(world):
    """State dict = step, this rank's residuals, warm-start Q: a rebuilt strategy continues exactly as if
    never interrupted."""
    for res in _run("resume-powersgd", world):
        resumed, uninterrupted = res["resumed"], res["uninterrupted"]
        assert resumed["state"]["step"] == RESUMED_STEPS
        assert resumed["state"]["residuals"].keys() == resumed["state"]["factors"].keys() != set()
        unequal = [
            n for n in uninterrupted["params"] if not torch.equal(resumed["params"][n], uninterrupted["params"][n])
        ]
        assert not unequal


@WORLDS
def test_ddp_powersgd_resumes_with_one_dense_step(world):
    """After a restore, the first step is a plain all-reduce (DDP rebuilds its buckets then); compression
    continues from the restored iteration, residuals and P/Q afterwards, identically on every rank."""
    results = _run("resume-ddp-powersgd", world)
    dense = {n: k * 4 for n, k in _numels().items()}
    compressed = _powersgd_bytes(RANK, 4)
    for res in results:
        out = res["resumed"]
        assert out["state"]["iter"] == RESUMED_STEPS
        _assert_bytes(out["stats"][0], dense, world)
        for s in out["stats"][1:]:
            _assert_bytes(s, compressed, world)
    assert_same_on_all_ranks([res["resumed"]["params"] for res in results])
