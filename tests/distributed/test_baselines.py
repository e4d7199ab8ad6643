"""Baseline strategies (allreduce, ddp, ddp-powersgd, powersgd) on real gloo processes, 2 and 4 ranks, against
exact oracles: the single-process gradient of the whole global batch, closed-form byte counts, torch's own
PowerSGD statistics.

Every rank runs all scenarios in one process group (`_all_scenarios`), once per world size; the tests below
read the results. Spawning is the slow part, so this keeps the file to two launches."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks
from dtrain.compression import build_strategy
from dtrain.compression.comm import Comm
from dtrain.compression.powersgd import MatrixPlan, initial_factor, power_iteration_mean
from dtrain.config import CommConfig
from toy_models import ToyEncoder, toy_batch

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
}


# --------------------------------------------------------------------------------------- on every rank
def _model() -> ToyEncoder:
    torch.manual_seed(0)
    return ToyEncoder()


def _backward(fwd: torch.nn.Module, step: int, rank: int, world: int) -> None:
    tokens, labels = toy_batch(step, GLOBAL_BATCH, rank, world)
    F.cross_entropy(fwd(tokens), labels).backward()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _one_step(rank: int, world: int, cfg: dict, state: Optional[dict] = None) -> dict[str, Any]:
    model = _model()
    strategy = build_strategy(CommConfig(**cfg))
    fwd = strategy.attach(model)
    if state is not None:
        strategy.load_state_dict(state)
    _backward(fwd, 0, rank, world)
    stats = strategy.synchronize()
    return {"grads": _grads(model), "stats": dataclasses.asdict(stats), "describe": strategy.describe()}


def _missing_grads(rank: int, world: int) -> dict[str, Any]:
    """allreduce when a gradient is None: head.bias on rank 0 only, norm.bias on every rank."""
    model = _model()
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
    model = _model()
    strategy = build_strategy(CommConfig(**cfg))
    fwd = strategy.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = _train(model, strategy, fwd, opt, range(steps), rank, world)
    out = {"stats": stats, "params": _params(model), "grads": _grads(model)}
    if cfg["strategy"] == "ddp-powersgd":
        out["torch_compression_stats"] = strategy.hook.state.compression_stats()
    return out


def _resumed(rank: int, world: int, cfg: dict, stop: int, steps: int) -> dict[str, Any]:
    """Train to `stop`, rebuild model, optimizer and strategy from their state dicts, train on to `steps`."""
    model = _model()
    strategy = build_strategy(CommConfig(**cfg))
    fwd = strategy.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, strategy, fwd, opt, range(stop), rank, world)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "strategy": strategy.state_dict()})

    model = _model()
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
    model = _model()
    strategy = build_strategy(CommConfig(strategy="ddp"))
    fwd = strategy.attach(model)
    with strategy.no_sync():
        _backward(fwd, 0, rank, world)
    skipped = dataclasses.asdict(strategy.synchronize())
    local = _grads(model)
    _backward(fwd, 1, rank, world)
    synced = dataclasses.asdict(strategy.synchronize())
    return {"skipped": skipped, "local": local, "synced": synced, "accumulated": _grads(model)}


def _full_rank_power_iteration(rank: int, world: int) -> dict[str, Any]:
    """The compressor itself at r = min(n, m), cold start, one step: P Pᵀ is the identity on the column space
    of the mean, so the result is the exact mean."""
    per_rank = [[torch.randn(n, m, generator=torch.Generator().manual_seed(100 * r + i)) for i, (n, m) in
                 enumerate(FULL_RANK_SHAPES)] for r in range(world)]
    plans = [MatrixPlan(f"m{i}", n, m, min(n, m)) for i, (n, m) in enumerate(FULL_RANK_SHAPES)]
    comm = Comm()
    approx, _ = power_iteration_mean(per_rank[rank], initial_factor(plans, 0, torch.float32), plans,
                                     comm.all_reduce_, comm.world_size, torch.float32)
    mean = [sum(ms) / world for ms in zip(*per_rank)]
    return {"approx": approx, "mean": mean, "stats": dataclasses.asdict(comm.reset())}


def _all_scenarios(rank: int, world: int) -> dict[str, Any]:
    skip_warmup = {"step": START, "residuals": {}, "factors": {}}
    return {
        "one_step": {
            "allreduce": _one_step(rank, world, TRAINED["allreduce"]),
            "ddp": _one_step(rank, world, TRAINED["ddp"]),
            "ddp-powersgd": _one_step(rank, world, TRAINED["ddp-powersgd"]),
            "powersgd-full-rank": _one_step(rank, world, dict(strategy="powersgd", rank=64), skip_warmup),
        },
        "trained": {name: _trained(rank, world, cfg) for name, cfg in TRAINED.items()},
        "resumed": {name: _resumed(rank, world, TRAINED[name], stop=RESUME_AT, steps=RESUMED_STEPS)
                    for name in ("powersgd", "ddp-powersgd")},
        "uninterrupted": _trained(rank, world, TRAINED["powersgd"], steps=RESUMED_STEPS),
        "ddp_no_sync": _ddp_no_sync(rank, world),
        "missing_grads": _missing_grads(rank, world),
        "full_rank": _full_rank_power_iteration(rank, world),
    }


# --------------------------------------------------------------------------------------- in the test process
@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def runs(request) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, run_ranks(_all_scenarios, world)


def _oracle_grads() -> dict[str, torch.Tensor]:
    """The gradient of the whole global batch on one process: what every exact strategy must deliver."""
    model = _model()
    _backward(model, 0, 0, 1)
    return _grads(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    errors = {n: _rel(got[n], want[n]) for n in want}
    assert max(errors.values()) <= tol, errors


def _assert_same_on_all_ranks(tensors: list[dict[str, torch.Tensor]]) -> None:
    for r, t in enumerate(tensors[1:], 1):
        unequal = [n for n in tensors[0] if not torch.equal(tensors[0][n], t[n])]
        assert not unequal, f"rank {r} differs from rank 0 in {unequal}"


def _numels() -> dict[str, int]:
    return {n: p.numel() for n, p in _model().named_parameters()}


def _powersgd_bytes(rank: int, factor_bytes: int, min_rate: float = 2.0) -> dict[str, int]:
    """Closed form per parameter: (n + m) r x factor size for a matrix where (n + m) r x rate < n m (the matrix
    view is (shape[0], numel / shape[0]), r = min(n, m, rank)); numel x 4 for everything else."""
    out = {}
    for name, p in _model().named_parameters():
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
@pytest.mark.parametrize("name", ["allreduce", "ddp", "ddp-powersgd", "powersgd-full-rank"])
def test_one_step_delivers_the_global_batch_gradient(runs, name):
    """ddp-powersgd's first step is a plain all-reduce (start_step); powersgd at rank >= min(n, m) sends every
    matrix raw, because a full-rank factorisation never passes (n + m) r x rate < n m."""
    world, results = runs
    oracle = _oracle_grads()
    for res in results:
        _assert_close(res["one_step"][name]["grads"], oracle)
    _assert_same_on_all_ranks([res["one_step"][name]["grads"] for res in results])


def test_allreduce_counts_a_missing_gradient_as_zero(runs):
    world, results = runs
    want = _oracle_grads()
    want["norm.bias"] = torch.zeros_like(want["norm.bias"])
    others = []
    for r in range(1, world):
        model = _model()
        _backward(model, 0, r, world)
        others.append(model.head.bias.grad)
    want["head.bias"] = sum(others) / world
    for res in results:
        _assert_close(res["missing_grads"]["grads"], want)
        _assert_bytes(res["missing_grads"]["stats"], {n: k * 4 for n, k in _numels().items()}, world)
    _assert_same_on_all_ranks([res["missing_grads"]["grads"] for res in results])


def test_ddp_equals_allreduce(runs):
    _, results = runs
    for res in results:
        _assert_close(res["one_step"]["ddp"]["grads"], res["one_step"]["allreduce"]["grads"])


def test_full_rank_power_iteration_is_the_exact_mean(runs):
    world, results = runs
    for res in results:
        out = res["full_rank"]
        for got, want in zip(out["approx"], out["mean"]):
            assert _rel(got, want) <= 1e-5
        assert out["stats"]["bytes_sent"] == sum((n + m) * min(n, m) * 4 for n, m in FULL_RANK_SHAPES)
    _assert_same_on_all_ranks([dict(enumerate(res["full_rank"]["approx"])) for res in results])


@pytest.mark.parametrize("name", list(TRAINED))
def test_replicas_stay_bitwise_identical(runs, name):
    _, results = runs
    _assert_same_on_all_ranks([res["trained"][name]["params"] for res in results])
    _assert_same_on_all_ranks([res["trained"][name]["grads"] for res in results])


def test_ddp_no_sync_sends_nothing_and_keeps_local_gradients(runs):
    world, results = runs
    for rank, res in enumerate(results):
        out = res["ddp_no_sync"]
        assert out["skipped"]["bytes_sent"] == 0 and out["skipped"]["per_layer"] == {}
        _assert_bytes(out["synced"], {n: k * 4 for n, k in _numels().items()}, world)
    local = [res["ddp_no_sync"]["local"] for res in results]
    assert all(_rel(local[0]["head.bias"], other["head.bias"]) > 1e-3 for other in local[1:])
    # the synced backward reduces the accumulated sum: the full-batch gradients of both batches, added
    both = _model()
    for step in (0, 1):
        _backward(both, step, 0, 1)
    for res in results:
        _assert_close(res["ddp_no_sync"]["accumulated"], _grads(both))


# --------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("name", ["allreduce", "ddp"])
def test_exact_strategies_send_every_gradient_once_in_fp32(runs, name):
    world, results = runs
    per_layer = {n: k * 4 for n, k in _numels().items()}
    for res in results:
        for stats in res["trained"][name]["stats"]:
            _assert_bytes(stats, per_layer, world)


def test_allreduce_buckets_respect_the_cap_and_charge_each_parameter(runs):
    _, results = runs
    numels = _numels()
    out = results[0]["one_step"]["allreduce"]
    buckets = out["describe"]["buckets"]
    assert len(buckets) > 1 and [n for b in buckets for n in b] == list(numels)
    cap = int(SMALL_BUCKETS_MB * 2**20)
    assert all(len(b) == 1 or sum(numels[n] for n in b) * 4 <= cap for b in buckets)
    assert set(out["stats"]["per_layer"]) == set(numels)


@pytest.mark.parametrize("name,factor_bytes,rank", [("powersgd", 4, RANK), ("powersgd-bf16", 2, RANK),
                                                     ("powersgd-rank1-fp16", 2, 1), ("ddp-powersgd", 4, RANK)])
def test_powersgd_bytes_follow_the_closed_form(runs, name, factor_bytes, rank):
    world, results = runs
    dense = {n: k * 4 for n, k in _numels().items()}
    compressed = _powersgd_bytes(rank, factor_bytes)
    assert sum(compressed.values()) < sum(dense.values())
    for res in results:
        stats = res["trained"][name]["stats"]
        for step, s in enumerate(stats):
            _assert_bytes(s, dense if step < START else compressed, world)


def test_powersgd_compresses_what_torch_compresses(runs):
    """Element counts per compressed step: ours (fp32 bytes / 4) against torch's PowerSGDState.compression_stats()
    for the same model and settings, accumulated over the STEPS - START compressed steps."""
    _, results = runs
    for res in results:
        _, before, after = res["trained"]["ddp-powersgd"]["torch_compression_stats"]
        ours = res["trained"]["powersgd"]["stats"]
        assert before == (STEPS - START) * sum(_numels().values())
        assert after == sum(s["bytes_sent"] // 4 for s in ours[START:])
        assert after < before


def test_compression_changes_the_gradient(runs):
    """Guards the tests above against a powersgd that silently sends raw: after START, delivered gradients
    are rank-2 approximations, so training departs from the exact run."""
    _, results = runs
    exact = results[0]["trained"]["allreduce"]["params"]
    for name in ("powersgd", "ddp-powersgd"):
        assert _rel(results[0]["trained"][name]["params"]["up.weight"], exact["up.weight"]) > 1e-4


# --------------------------------------------------------------------------------------- checkpoints
def test_powersgd_resumes_bitwise(runs):
    """State dict = step, this rank's residuals, warm-start Q: a rebuilt strategy continues exactly as if
    never interrupted."""
    _, results = runs
    for res in results:
        resumed, uninterrupted = res["resumed"]["powersgd"], res["uninterrupted"]
        assert resumed["state"]["step"] == RESUMED_STEPS
        assert resumed["state"]["residuals"].keys() == resumed["state"]["factors"].keys() != set()
        unequal = [n for n in uninterrupted["params"]
                   if not torch.equal(resumed["params"][n], uninterrupted["params"][n])]
        assert not unequal


def test_ddp_powersgd_resumes_with_one_dense_step(runs):
    """After a restore, the first step is a plain all-reduce (DDP rebuilds its buckets then); compression
    continues from the restored iteration, residuals and P/Q afterwards, identically on every rank."""
    world, results = runs
    dense = {n: k * 4 for n, k in _numels().items()}
    compressed = _powersgd_bytes(RANK, 4)
    for res in results:
        out = res["resumed"]["ddp-powersgd"]
        assert out["state"]["iter"] == RESUMED_STEPS
        _assert_bytes(out["stats"][0], dense, world)
        for s in out["stats"][1:]:
            _assert_bytes(s, compressed, world)
    _assert_same_on_all_ranks([res["resumed"]["ddp-powersgd"]["params"] for res in results])
