"""State tracking in S5 and A5: tokens are generators of the group, the target at each position is the prefix
product (the state), an NC1-complete problem for fixed-depth transformers.

Token 0 is the identity, tokens 1 and 2 are two generators of the group. The state after position t is
p_t = g_t ∘ p_{t-1} (apply g_1 first), p_0 = identity, and the class is the index of p_t among the group's
elements in lexicographic order of their one-line notation. Each example draws its own rate r ~ U(0, 1) of
non-identity tokens; the difficulty is the number of non-identity tokens, i.e. the number of state changes.
A token's difficulty (`token_difficulty`) is the number of non-identity tokens up to and including it: the
state changes its target has been through, the example's difficulty at its last token.
"""

from __future__ import annotations

import numpy as np
import torch

from dtrain.config import DataConfig

from .tasks import Example, GeneratedTask, TaskSpec

Permutation = tuple[int, ...]

#: the identity token (the generators are tokens 1 and 2)
IDENTITY = 0

# S5 = <(0 1), (0 1 2 3 4)>. A5 = <(0 1 2), (0 1 2 3 4)>: both are even, and the only subgroup of A5 whose order
# is divisible by 3 and 5 is A5 itself.
GENERATORS: dict[str, tuple[Permutation, Permutation]] = {
    "s5": ((1, 0, 2, 3, 4), (1, 2, 3, 4, 0)),
    "a5": ((1, 2, 0, 3, 4), (1, 2, 3, 4, 0)),
}


def compose(after: Permutation, before: Permutation) -> Permutation:
    """(after ∘ before)(i) = after[before[i]]."""
    return tuple(after[i] for i in before)


def closure(generators: tuple[Permutation, ...]) -> list[Permutation]:
    """All elements of the group the generators generate, sorted."""
    identity = tuple(range(len(generators[0])))
    seen, frontier = {identity}, [identity]
    while frontier:
        frontier = [compose(g, p) for p in frontier for g in generators]
        frontier = [p for p in dict.fromkeys(frontier) if p not in seen]
        seen.update(frontier)
    return sorted(seen)


class StateTracking(GeneratedTask):
    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        generators = GENERATORS[cfg.task]
        elements = closure(generators)
        index = {p: i for i, p in enumerate(elements)}
        identity = tuple(range(5))
        # successor[token, state] = class of token ∘ state
        self.successor = np.array([[index[compose(g, p)] for p in elements] for g in (identity, *generators)])
        self.identity_class = index[identity]
        self.spec = TaskSpec(
            name=cfg.task,
            vocab_size=1 + len(generators),
            seq_len=cfg.seq_len,
            num_classes=len(elements),
            per_token=True,
            targets_per_example=cfg.seq_len,
            pad_id=None,
        )

    def token_difficulty(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B, L]: non-identity tokens up to and including each position."""
        return (tokens != IDENTITY).long().cumsum(dim=1)

    def sample(self, rng: np.random.Generator) -> Example:
        length = self.spec.seq_len
        change_rate = rng.random()
        changes = rng.random(length) < change_rate
        tokens = np.where(changes, rng.integers(1, self.spec.vocab_size, size=length), IDENTITY).astype(np.int64)
        states = np.empty(length, dtype=np.int64)
        state = self.identity_class
        for t, token in enumerate(tokens):
            state = self.successor[token, state]
            states[t] = state
        return Example(tokens=tokens, targets=states, difficulty=int(changes.sum()))
