"""What a lossy strategy remembers between steps, kept apart from the compressor that fills it (GRACE's memory).

- `TensorMemory`: named tensors with `state_dict` (PowerSGD keeps its warm-start factor Q here).
- `ErrorFeedback`: residuals of lossy compression, added back to the next step's gradient.

Names are parameter names, so a checkpoint stays readable and survives a change of bucketing.
"""
from __future__ import annotations

from typing import Optional

import torch


class TensorMemory:
    """Named tensors that persist across steps and go into checkpoints."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self._tensors.get(name)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._tensors[name] = tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self._tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        bad = sorted(name for name, t in state.items() if not isinstance(t, torch.Tensor))
        if bad:
            raise ValueError(f"memory state: entries {bad} are not tensors")
        self._tensors = {name: t.detach().clone() for name, t in state.items()}


class ErrorFeedback(TensorMemory):
    """Error feedback (Seide et al. 2014; PowerSGD's memory): what compression dropped on this rank is added to
    the next gradient, so a biased compressor loses nothing in the long run.

    Per rank and tensor, with compensated = gradient + previous residual:

        compensated = delivered + new residual            (exact: the residual is defined as the difference)
        sum over steps of gradients = sum of delivered + last residual

    Residuals differ between ranks (each holds its own error): checkpoint them per rank.
    """

    def compensate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """gradient + residual, as a new tensor (the caller may overwrite `grad` afterwards)."""
        residual = self.get(name)
        return grad.clone() if residual is None else grad + residual

    def update(self, name: str, compensated: torch.Tensor, delivered: torch.Tensor) -> None:
        """Remember what `compensated` lost on its way to `delivered`."""
        self.put(name, compensated - delivered)
