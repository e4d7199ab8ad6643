"""Gradient accumulation's config rule, the training DataLoader (order, workers, RNG, micro-batches) and the
trainer's hot path (one fused finiteness check, one host sync per step), without a process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtrain.config import ConfigError, check_world_size, config_from_dict, load_config
from dtrain.data import build_task
from dtrain.data.loader import StepBatches, TrainLoader, micro_batches
from dtrain.distributed import DistEnv
from dtrain.syncs import count_syncs
from dtrain.trainer import Trainer, _nonfinite, loss_fn
from tests.helpers.launch import TINY


def _cfg(**train) -> object:
    return config_from_dict({"train": {"batch_size": 8, **train}})


def test_grad_accum_defaults_to_one_and_must_be_positive():
    assert _cfg().train.grad_accum == 1
    assert (_cfg().data.workers, _cfg().data.prefetch) == (1, 2)
    with pytest.raises(ConfigError, match=r"^train.grad_accum: 0 is invalid"):
        _cfg(grad_accum=0)


def test_batch_must_split_into_ranks_times_micro_batches():
    check_world_size(_cfg(grad_accum=4), 2)
    check_world_size(_cfg(grad_accum=2), 4)
    with pytest.raises(ConfigError) as err:
        check_world_size(_cfg(grad_accum=3), 2)
    message = str(err.value)
    assert "\n" not in message
    assert "train.batch_size=8" in message and "train.grad_accum=3" in message and "world size 2" in message
    with pytest.raises(ConfigError, match=r"^train.batch_size=8 is not divisible by the world size 3$"):
        check_world_size(_cfg(), 3)  # accum 1: the message the fault suite and users know


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1), (4, 3)])
def test_loader_items_are_the_tasks_batches_in_step_order(world: int, rank: int):
    cfg = load_config(TINY)
    task = build_task(cfg.data)
    B, n = 8, 8 // world
    loader = TrainLoader(task, B, world, rank, start=2, stop=5, workers=0)
    for step in range(2, 5):
        got, want = loader.next(), task.batch("train", step * B + rank * n, n)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)
        assert torch.equal(got.targets, want.targets)
    with pytest.raises(StopIteration):
        loader.next()
    loader.close()


def test_workers_deliver_the_same_batches_and_leave_the_global_rng_alone():
    cfg = load_config(TINY)
    task = build_task(cfg.data)
    rng = torch.get_rng_state()
    batches = {}
    for workers in (0, 1, 2):
        loader = TrainLoader(task, 8, 2, 1, start=3, stop=9, workers=workers, prefetch=3)
        batches[workers] = [loader.next() for _ in range(6)]
        loader.close()
        loader.close()  # idempotent
    assert torch.equal(torch.get_rng_state(), rng), "the loader drew from torch's global RNG (dropout, resume)"
    for workers in (1, 2):
        for a, b in zip(batches[0], batches[workers]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_micro_batches_are_contiguous_equal_views():
    task = build_task(load_config(TINY).data)
    batch = StepBatches(task, 8, 1, 0)[0].tensors()
    parts = micro_batches(batch, 4)
    assert len(parts) == 4 and all(p.tokens.shape[0] == 2 for p in parts)
    for field in range(3):
        assert torch.equal(torch.cat([p[field] for p in parts]), batch[field])
    assert micro_batches(batch, 1) == [batch]


def test_micro_losses_add_up_to_the_mean_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 5, 3), torch.randint(0, 3, (8, 5))
    whole = loss_fn(logits, targets, 5)
    parts = sum(loss_fn(lo, t, 5, examples=8) for lo, t in zip(logits.chunk(4), targets.chunk(4)))
    assert torch.allclose(parts, whole, rtol=1e-6)


def test_the_finiteness_check_is_fused_and_needs_no_host_sync():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).sum().backward()
    loss = torch.tensor(1.5)
    with count_syncs() as syncs:
        flags = [_nonfinite(loss, model)]
    assert syncs.total == 0, str(syncs)
    model[1].bias.grad[0] = float("inf")
    flags.append(_nonfinite(loss, model))
    model[1].bias.grad[0] = 0.0
    model[0].weight.grad[2, 1] = float("nan")
    flags.append(_nonfinite(loss, model))
    model[0].weight.grad[2, 1] = 0.0
    flags.append(_nonfinite(torch.tensor(float("nan")), model))
    assert [float(f) for f in flags] == [0.0, 1.0, 1.0, 1.0]


def test_the_trainer_reads_the_host_once_per_step(tmp_path: Path):
    """Loss, NaN flag and gradient norm reach the host in one read (the flags all-reduce's tolist), whatever
    grad_accum is; the model's own syncs are not the trainer's."""
    cfg = load_config(
        TINY, [f"run.dir={tmp_path}", "model.attention=vanilla", "train.grad_accum=2", "train.grad_clip=1.0"]
    )
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    trainer.loader = TrainLoader(trainer.task, 8, 1, 0, start=0, stop=3, workers=0)
    totals = trainer.running_totals(0, {})
    try:
        for step in range(3):
            with count_syncs() as syncs:
                row = trainer._train_step(step, totals)
            ours = {site: n for site, n in syncs.by_site.items() if site.startswith("trainer.py")}
            assert sum(ours.values()) == 1, str(syncs)
            assert row["grad_norm"] == row["grad_norm"] and not row["skipped"]
            assert 0.0 <= row["time/data_wait_s"] <= row["time/step_s"]
    finally:
        trainer.loader.close()
        trainer.strategy.close()
