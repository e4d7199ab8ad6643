"""Prefix parity: bits b_1..b_L, target at position i = b_1 xor ... xor b_i.

Each example first draws its own rate p ~ U(0, 1) of ones, so the number of ones (the number of times the
running parity flips, used as the difficulty) is spread evenly over 0..L instead of bunching around L/2. A
token's difficulty (`token_difficulty`) is the number of ones up to and including it: the flips its target has
been through.
"""

from __future__ import annotations

import numpy as np
import torch

from dtrain.config import DataConfig

from .tasks import Example, GeneratedTask, TaskSpec


class PrefixParity(GeneratedTask):
    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.spec = TaskSpec(
            name="parity",
            vocab_size=2,
            seq_len=cfg.seq_len,
            num_classes=2,
            per_token=True,
            targets_per_example=cfg.seq_len,
            pad_id=None,
        )

    def token_difficulty(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B, L]: ones up to and including each position."""
        return tokens.long().cumsum(dim=1)

    def sample(self, rng: np.random.Generator) -> Example:
        ones_rate = rng.random()
        bits = (rng.random(self.spec.seq_len) < ones_rate).astype(np.int64)
        return Example(tokens=bits, targets=np.cumsum(bits) % 2, difficulty=int(bits.sum()))
