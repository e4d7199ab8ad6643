"""The task interface, and the generated tasks: examples addressed by (split, index), pure, held out by construction.

`Task` is what the trainer, the loader and the evaluation read: a `TaskSpec`, the number of validation examples
`n_val`, and `batch(split, start, count)`. Every task makes example i of a split a pure function of its config
and i, so any rank builds exactly its own shard whatever the world size.

`GeneratedTask` (parity, s5, a5, listops): example `index` of `split` is drawn from a numpy Generator seeded with
(data.seed, split, index, attempt). A candidate is kept only if a hash of its tokens assigns it to that split,
otherwise the next attempt is drawn. So a batch equals its examples built one at a time, and a token sequence that
can appear in "val" can never appear in "train" (the hash decides, not the sampler). The digits and text tasks
(digits.py, text/) hold fixed example arrays instead.
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
    #: whether the validation metrics include val/perplexity = exp(val/loss) (masked-LM)
    reports_perplexity: bool = False


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


def stack_batch(tokens: np.ndarray, targets: np.ndarray, difficulty: np.ndarray, pad_id: int | None) -> Batch:
    """A `Batch` of int64 arrays; the mask marks every token that is not `pad_id` (all of them when None)."""
    tokens_t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    mask = torch.ones_like(tokens_t, dtype=torch.bool) if pad_id is None else tokens_t != pad_id
    return Batch(
        tokens=tokens_t,
        targets=torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)),
        mask=mask,
        difficulty=torch.from_numpy(np.ascontiguousarray(difficulty, dtype=np.int64)),
    )


def check_split(split: str) -> None:
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


class Task(abc.ABC):
    """What the trainer reads: `spec`, `n_val` validation examples, and batches addressed by (split, index).

    The training split is an endless stream (index i of a finite dataset is example i mod its size, in a seeded
    order per pass); "val" holds indices 0 .. n_val-1."""

    spec: TaskSpec
    n_val: int

    @abc.abstractmethod
    def batch(self, split: Split, start: int, count: int) -> Batch:
        """Examples start .. start+count-1 of `split`, stacked."""

    def run_files(self) -> dict[str, str]:
        """Files (name -> text) the run directory keeps so a resumed run rebuilds this task identically."""
        return {}

    def token_difficulty(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """int64 [B, L]: the difficulty of each token of `tokens` [B, L] (a batch's, on any device), or None for
        a task without a per-token notion of difficulty (digits, text). The one definition that the evaluation
        (fpsa/iters_by_token_difficulty) and bench/fpsa_adaptivity.py use; padding gets some value, callers keep
        the real tokens only. For the generated tasks an example's `difficulty` is the largest of its tokens'
        (see each task's docstring)."""
        return None


class GeneratedTask(Task):
    """A synthetic task. Subclasses say how to sample one candidate example; this class makes it addressable."""

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
        check_split(split)
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
        length = self.spec.seq_len
        tokens = np.empty((count, length), dtype=np.int64)
        targets = np.empty((count, length) if self.spec.per_token else (count,), dtype=np.int64)
        difficulty = np.empty(count, dtype=np.int64)
        for row in range(count):
            example = self.example(split, start + row)
            tokens[row], targets[row], difficulty[row] = example.tokens, example.targets, example.difficulty
        return stack_batch(tokens, targets, difficulty, self.spec.pad_id)


@dataclass(frozen=True)
class ExampleArrays:
    """A split of a dataset held in arrays (numpy or memory-mapped): row i is example i."""

    tokens: np.ndarray  # integer [N, L]
    targets: np.ndarray  # integer [N] or [N, L]; IGNORE where there is no target
    difficulty: np.ndarray  # integer [N]

    def __len__(self) -> int:
        return len(self.tokens)


class ArrayTask(Task):
    """A task over fixed example arrays (digits, text). The training stream visits the training rows in a new
    seeded order on every pass: stream index i is row order(i // N)[i mod N], so a batch depends only on
    (data.seed, i) and never on the world size. "val" is the first n_val validation rows, in order.

    Subclasses may override `examples` to derive targets per stream index (masked-LM draws its mask there)."""

    def __init__(self, spec: TaskSpec, seed: int, train: ExampleArrays, val: ExampleArrays, n_val: int) -> None:
        if len(train) == 0:
            raise ValueError(f"{spec.name}: the training split holds no examples")
        if len(val) == 0:
            raise ValueError(f"{spec.name}: the validation split holds no examples")
        self.spec, self.seed = spec, seed
        self.train, self.val = train, val
        self.n_val = min(n_val, len(val))
        self._order: tuple[int, np.ndarray] | None = None  # (pass, permutation) of the last pass read

    def order(self, epoch: int) -> np.ndarray:
        """The training rows in the order of pass `epoch`."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed % 2**63, 7, epoch])
            self._order = (epoch, rng.permutation(len(self.train)))
        return self._order[1]

    def rows(self, split: Split, start: int, count: int) -> np.ndarray:
        """The dataset rows of stream indices start .. start+count-1 of `split`."""
        check_split(split)
        if start < 0 or count < 0 or (split == "val" and start + count > self.n_val):
            raise IndexError(f"{self.spec.name}: {split} indices {start}..{start + count - 1} out of range")
        if split == "val":
            return np.arange(start, start + count)
        n = len(self.train)
        stream = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(stream // n):
            sel = stream // n == epoch
            out[sel] = self.order(int(epoch))[stream[sel] % n]
        return out

    def examples(self, split: Split, rows: np.ndarray, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, targets) of dataset rows `rows`, read as stream indices `stream`."""
        arrays = self.train if split == "train" else self.val
        return np.asarray(arrays.tokens[rows]), np.asarray(arrays.targets[rows])

    def batch(self, split: Split, start: int, count: int) -> Batch:
        rows = self.rows(split, start, count)
        tokens, targets = self.examples(split, rows, np.arange(start, start + count))
        difficulty = (self.train if split == "train" else self.val).difficulty[rows]
        return stack_batch(tokens, targets, np.asarray(difficulty), self.spec.pad_id)
