"""`FactorMemory`: what a factor codec (rank-dAD's all-gather and all-reduce forms) remembers per layer, in one
part the two codecs compose instead of each keeping its own copy:

- `residuals` (`memory.ErrorFeedback`): this rank's error feedback;
- `starts` (`memory.TensorMemory`): the warm-start Q of each layer, the same on every rank;
- `step`: seeds the random starts, one seed per (layer, step), the same on every rank;
- `ranks` (`ranks.LayerRanks`): k per layer (comm.rank, or from a budget) and the measured spectra;
- `undo` (`memory.StepUndo`): a non-finite step's changes to residuals and starts, taken back at `end_step`.

`state_dict` keys carry the codec's prefix, so both codecs' state can sit side by side in one checkpoint (`auto`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..lowrank import random_start
from ..memory import ErrorFeedback, StepUndo, TensorMemory
from ..ranks import LayerRanks


class FactorMemory:
    def __init__(self, options: Any, prefix: str, codec: str) -> None:
        self.options = options
        self.prefix, self.codec = prefix, codec
        self.residuals = ErrorFeedback()
        self.starts = TensorMemory()
        self.step = 0
        self.undo = StepUndo(self.starts, self.residuals)
        self.ranks = LayerRanks(options.rank)
        self._index: dict[str, int] = {}

    def bind(self, layer_names: list[str]) -> None:
        self._index = {name: i for i, name in enumerate(layer_names)}

    def start(self, name: str, in_features: int, k: int, like: torch.Tensor) -> torch.Tensor:
        """The Q a layer's power iteration starts from: last step's (with comm.warm_start, if k is unchanged),
        else a Gaussian seeded by (layer, step): the same on every rank, a fresh draw every step."""
        q = self.starts.get(name) if self.options.warm_start else None
        if q is not None and q.shape == (in_features, k):
            return q.to(like)
        seed = self.step * max(1, len(self._index)) + self._index[name]
        return random_start(in_features, k, seed, like)

    def end_step(self) -> None:
        self.undo.end_step()
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        """`step` and `starts` are the same on every rank; `residuals` are this rank's own."""
        p = self.prefix
        return {
            f"{p}step": self.step,
            f"{p}starts": self.starts.state_dict(),
            f"{p}residuals": self.residuals.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.prefix
        unknown = (set(state[f"{p}starts"]) | set(state[f"{p}residuals"])) - set(self._index)
        if unknown:
            raise ValueError(f"{self.codec}: state for unknown layers {sorted(unknown)}")
        self.step = int(state[f"{p}step"])
        self.starts.load_state_dict(state[f"{p}starts"])
        self.residuals.load_state_dict(state[f"{p}residuals"])
