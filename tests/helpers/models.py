"""Small models that exercise every kind of parameter a strategy must handle, and their batches."""

from __future__ import annotations

import torch
from torch import nn


class ToyEncoder(nn.Module):
    """Embedding -> Linear (bias) -> LayerNorm -> Linear (no bias) -> Linear head, fed (batch, seq) tokens.

    Inputs to the Linear layers are (batch, seq, features), so dAD must flatten batch x seq into rows.
    """

    def __init__(self, vocab: int = 11, d: int = 16, hidden: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(torch.relu(self.norm(self.up(h))))
        return self.head(h).mean(dim=1)


# the weights of ToyEncoder's three Linear layers: what the dAD family captures
TOY_LAYERS = ("up", "down", "head")


def seeded_encoder(seed: int = 0) -> ToyEncoder:
    """The ToyEncoder every rank and every oracle starts from."""
    torch.manual_seed(seed)
    return ToyEncoder()


def toy_batch(
    step: int, global_batch: int, rank: int, world: int, seq: int = 6, vocab: int = 11, classes: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's contiguous slice of a global batch that does not depend on the world size."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (global_batch, seq), generator=g)
    labels = torch.randint(0, classes, (global_batch,), generator=g)
    n = global_batch // world
    return tokens[rank * n : (rank + 1) * n], labels[rank * n : (rank + 1) * n]
