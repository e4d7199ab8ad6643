"""The tasks (see dtrain/data/tasks.py). Contract used by the trainer:

    task = build_task(cfg.data, run_dir, share)  # cfg.data: dtrain.config.DataConfig
    task.spec                                   # TaskSpec
    task.n_val                                  # validation examples
    b = task.batch("train" | "val", start, count)
    b.tokens  int64 [count, L]     b.mask bool [count, L] (True = real token)
    b.targets int64 [count] (per-sequence) or [count, L] (per-token), -100 = ignored
    b.difficulty int64 [count]

Example i of a split is a pure function of the data config and i: any rank builds exactly its own shard, and val
examples never occur in train. The generated tasks (parity, s5, a5, listops) sample from a seed; digits reads
scikit-learn's bundled images; text reads your files or a Hugging Face dataset (docs/data.md).

`run_dir` is where a task keeps what a resumed run must reuse (the text task's trained tokenizer); `share(fn)`
runs `fn` on rank 0 and hands its result (or its ConfigError) to every rank, so one rank trains the tokenizer.
Both default to a single process with nothing kept.

The trainer reads its training batches through `dtrain.data.loader.TrainLoader` (a DataLoader whose item t is
this rank's share of step t, built in `data.workers` processes ahead of the step), not `task.batch` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dtrain.config import TASK_NAMES, DataConfig

from .groups import StateTracking
from .listops import ListOps
from .parity import PrefixParity
from .tasks import IGNORE, ArrayTask, Batch, Example, ExampleArrays, Task, TaskSpec

T = TypeVar("T")
Share = Callable[[Callable[[], Any]], Any]


def _alone(fn: Callable[[], T]) -> T:
    return fn()


def build_task(cfg: DataConfig, run_dir: Path | None = None, share: Share = _alone) -> Task:
    if cfg.task == "parity":
        return PrefixParity(cfg)
    if cfg.task in ("s5", "a5"):
        return StateTracking(cfg)
    if cfg.task == "listops":
        return ListOps(cfg)
    if cfg.task == "digits":
        from .digits import Digits

        return Digits(cfg)
    if cfg.task == "text":
        from .text import build_text_task

        return build_text_task(cfg, run_dir, share)
    raise ValueError(f"data.task: {cfg.task!r} is not one of {', '.join(TASK_NAMES)}")


__all__ = ["ArrayTask", "Batch", "Example", "ExampleArrays", "IGNORE", "Task", "TaskSpec", "build_task"]
