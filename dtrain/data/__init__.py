"""Synthetic reasoning tasks (see dtrain/data/tasks.py). Contract used by the trainer:

    task = build_task(cfg.data)                 # cfg.data: dtrain.config.DataConfig
    task.spec                                   # TaskSpec
    b = task.batch("train" | "val", start, count)
    b.tokens  int64 [count, L]     b.mask bool [count, L] (True = real token)
    b.targets int64 [count] (per-sequence) or [count, L] (per-token), -100 = ignored
    b.difficulty int64 [count]

Example i of a split is a pure function of (data.seed, split, i): any rank builds exactly its own shard, and
val examples never occur in train.

The trainer reads its training batches through `dtrain.data.loader.TrainLoader` (a DataLoader whose item t is
this rank's share of step t, built in `data.workers` processes ahead of the step), not `task.batch` directly.
"""

from __future__ import annotations

from dtrain.config import TASK_NAMES, DataConfig

from .groups import StateTracking
from .listops import ListOps
from .parity import PrefixParity
from .tasks import IGNORE, Batch, Example, Task, TaskSpec


def build_task(cfg: DataConfig) -> Task:
    if cfg.task == "parity":
        return PrefixParity(cfg)
    if cfg.task in ("s5", "a5"):
        return StateTracking(cfg)
    if cfg.task == "listops":
        return ListOps(cfg)
    raise ValueError(f"data.task: {cfg.task!r} is not one of {', '.join(TASK_NAMES)}")


__all__ = ["Batch", "Example", "IGNORE", "Task", "TaskSpec", "build_task"]
