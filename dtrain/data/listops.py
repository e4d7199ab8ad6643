"""ListOps: nested MAX / MIN / MED / SM (sum mod 10) expressions over digits, one label 0..9 per sequence.

    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9

MED is the lower median (the middle element of the sorted arguments, the lower one of the two middle elements
for an even count), so every value is a digit. The difficulty is the nesting depth, drawn uniformly from
1..data.max_depth; every expression fits seq_len (the rest is padding) because each argument is generated
within the tokens its later siblings leave over.

A token's difficulty (`token_difficulty`) is its nesting depth: the lists open at it, its own "[OP" and "]"
included (in the example above 1 for "[MAX 2 9", "0" and the last "]", 2 for "[MIN 4 7 ]"), 0 for padding;
the example's difficulty is the largest. Its answer depends on the whole expression, so this is where in the
expression a token sits, not what its own prediction needs; sequences are padded to data.seq_len, so the
length of the input is fixed while the expression's is not.
"""

from __future__ import annotations

import numpy as np
import torch

from dtrain.config import DataConfig

from .tasks import Example, GeneratedTask, TaskSpec

PAD = 0
DIGIT0 = 1  # digit d is token DIGIT0 + d
OPS = ("MAX", "MIN", "MED", "SM")
OP0 = DIGIT0 + 10  # operator j is token OP0 + j, written "[MAX" etc.
CLOSE = OP0 + len(OPS)
VOCAB = CLOSE + 1
MAX_ARGS = 5
NEST_PROB = 0.35  # chance that an argument other than the one carrying the depth is itself an expression


def min_length(depth: int) -> int:
    """Tokens in the shortest expression of nesting depth `depth` ([OP sub d ] per level)."""
    return 3 * depth + 1


def apply(op: str, values: list[int]) -> int:
    if op == "MAX":
        return max(values)
    if op == "MIN":
        return min(values)
    if op == "MED":
        return sorted(values)[(len(values) - 1) // 2]
    return sum(values) % 10


def expression(rng: np.random.Generator, depth: int, budget: int) -> tuple[list[int], int]:
    """A random expression of nesting depth exactly `depth` in at most `budget` tokens: (tokens, value)."""
    deep_min = min_length(depth - 1) if depth > 1 else 1
    n_args = int(rng.integers(2, min(MAX_ARGS, budget - 2 - deep_min + 1) + 1))
    deep_arg = int(rng.integers(n_args))
    op = int(rng.integers(len(OPS)))
    tokens, values = [OP0 + op], []
    room = budget - 2  # for the arguments, between "[OP" and "]"
    for j in range(n_args):
        later_min = (n_args - 1 - j) + (deep_min - 1 if j < deep_arg else 0)
        available = room - later_min
        if j == deep_arg and depth > 1:
            arg_tokens, value = expression(rng, depth - 1, available)
        elif j != deep_arg and depth > 1 and available >= min_length(1) and rng.random() < NEST_PROB:
            sub_depth = int(rng.integers(1, min(depth - 1, (available - 1) // 3) + 1))
            arg_tokens, value = expression(rng, sub_depth, available)
        else:
            value = int(rng.integers(10))
            arg_tokens = [DIGIT0 + value]
        tokens += arg_tokens
        values.append(value)
        room -= len(arg_tokens)
    return tokens + [CLOSE], apply(OPS[op], values)


class ListOps(GeneratedTask):
    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        if cfg.seq_len < min_length(cfg.max_depth):
            raise ValueError(
                f"data.seq_len={cfg.seq_len} is too short for listops with data.max_depth="
                f"{cfg.max_depth}: the shortest such expression has {min_length(cfg.max_depth)} tokens"
            )
        self.max_depth = cfg.max_depth
        self.spec = TaskSpec(
            name="listops",
            vocab_size=VOCAB,
            seq_len=cfg.seq_len,
            num_classes=10,
            per_token=False,
            targets_per_example=1,
            pad_id=PAD,
        )

    def token_difficulty(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B, L]: the nesting depth of each token (0 for padding)."""
        opens = ((tokens >= OP0) & (tokens < CLOSE)).long()
        closes = (tokens == CLOSE).long()
        # lists opened up to and including this token, minus those closed before it
        return opens.cumsum(dim=1) - (closes.cumsum(dim=1) - closes)

    def sample(self, rng: np.random.Generator) -> Example:
        depth = int(rng.integers(1, self.max_depth + 1))
        tokens, value = expression(rng, depth, self.spec.seq_len)
        padded = np.full(self.spec.seq_len, PAD, dtype=np.int64)
        padded[: len(tokens)] = tokens
        return Example(tokens=padded, targets=np.array(value, dtype=np.int64), difficulty=depth)
