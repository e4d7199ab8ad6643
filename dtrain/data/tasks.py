"""The task interface: examples addressed by (split, index), pure, and held-out by construction.

Example `index` of `split` is drawn from a numpy Generator seeded with (data.seed, split, index, attempt). A
candidate is kept only if a hash of its tokens assigns it to that split, otherwise the next attempt is drawn.
So any rank can build exactly the examples it needs, a batch equals its examples built one at a time, and a
token sequence that can appear in "val" can never appear in "train" (the hash decides, not the sampler).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dtrain.config import DataConfig

Split = Literal["train", "val"]
_SPLIT_CODE = {"train": 0, "val": 1}

#: share of all possible token sequences reserved for "val"
VAL_FRACTION = 0.2
#: a split that rejects this many candidates in a row has (almost) no examples: the task is too small
MAX_ATTEMPTS = 2000
#: the cross-entropy ignore index used in per-token targets
IGNORE = -100


@dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know about a task.

    targets_per_example: target positions per example, the same for every example (seq_len for per-token tasks,
        1 for per-sequence ones), so a summed loss divided by count * targets_per_example does not depend on how
        a global batch is split over ranks.
    pad_id: the padding token, or None for tasks whose sequences always fill seq_len.
    """

    name: str
    vocab_size: int
    seq_len: int
    num_classes: int
    per_token: bool
    targets_per_example: int
    pad_id: int | None


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int64 [seq_len], padded with pad_id
    targets: np.ndarray  # int64 [seq_len] (per-token) or [] (per-sequence)
    difficulty: int


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [count, L]
    targets: torch.Tensor  # int64 [count] or [count, L]; IGNORE where there is no target
    mask: torch.Tensor  # bool [count, L], True = real token
    difficulty: torch.Tensor  # int64 [count]


class Task(abc.ABC):
    """A synthetic task. Subclasses say how to sample one candidate example; this class makes it addressable."""

    spec: TaskSpec

    def __init__(self, cfg: DataConfig) -> None:
        self.seed = cfg.seed
        self.n_val = cfg.n_val

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> Example:
        """A random candidate example (any split)."""

    def split_of(self, tokens: np.ndarray) -> Split:
        digest = hashlib.blake2b(tokens.astype(np.int64).tobytes(), digest_size=8, key=str(self.seed).encode()).digest()
        return "val" if int.from_bytes(digest, "little") < VAL_FRACTION * 2**64 else "train"

    def example(self, split: Split, index: int) -> Example:
        if split not in _SPLIT_CODE:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if index < 0 or (split == "val" and index >= self.n_val):
            raise IndexError(
                f"{self.spec.name}: {split} index {index} out of range"
                + (f" (data.n_val={self.n_val})" if split == "val" else "")
            )
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed % 2**63, _SPLIT_CODE[split], index, attempt])
            candidate = self.sample(rng)
            if self.split_of(candidate.tokens) == split:
                return candidate
        raise RuntimeError(
            f"{self.spec.name}: no {split} example found in {MAX_ATTEMPTS} draws; "
            f"seq_len={self.spec.seq_len} allows too few distinct sequences to hold out a split"
        )

    def batch(self, split: Split, start: int, count: int) -> Batch:
        """Examples start .. start+count-1 of `split`, stacked."""
        length = self.spec.seq_len
        tokens = np.empty((count, length), dtype=np.int64)
        targets = np.empty((count, length) if self.spec.per_token else (count,), dtype=np.int64)
        difficulty = np.empty(count, dtype=np.int64)
        for row in range(count):
            example = self.example(split, start + row)
            tokens[row], targets[row], difficulty[row] = example.tokens, example.targets, example.difficulty
        tokens_t = torch.from_numpy(tokens)
        if self.spec.pad_id is None:
            mask = torch.ones_like(tokens_t, dtype=torch.bool)
        else:
            mask = tokens_t != self.spec.pad_id
        return Batch(
            tokens=tokens_t, targets=torch.from_numpy(targets), mask=mask, difficulty=torch.from_numpy(difficulty)
        )
