"""Mixed precision (`train.precision`): autocast for the forward and the loss; for fp16 also a gradient scaler.

- fp32: nothing changes.
- bf16: `torch.autocast(device, bfloat16)` (CPU and CUDA). bf16 has fp32's range: no scaler.
- fp16: `torch.autocast(device, float16)` and `torch.amp.GradScaler`. The loss is multiplied by the scale before
  backward, so every strategy synchronises scaled gradients; afterwards the scaler divides them by the scale
  and skips the update when they overflowed (the scale then shrinks). Dividing the synchronised mean is the same
  as dividing every rank's gradient first, so this is exact for the exact strategies. Lossy strategies keep their
  error feedback in the units of the scaled gradients: when the scale changes they rescale it by new/old
  (`Strategy.rescale_memory`), so a residual is never added to gradients of another scale.

Parameters, optimizer state and the master weights stay fp32; under autocast the dAD family captures 16-bit A
and Δ (`compression.capture`), so their rows travel in 16 bits.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device_type = device.type
        self.dtype = AUTOCAST_DTYPES.get(name)
        self.scaler = torch.amp.GradScaler(self.device_type) if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for forward and loss."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """What to call backward on."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """After the strategy's synchronize: the gradients in their true units (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), which the scaler skips when the gradients overflowed."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)

    def update(self, strategy: Any) -> None:
        """End of a step: a scaler adapts its scale (after every step, taken or skipped), and the strategy's error
        feedback follows it."""
        if self.scaler is None:
            return
        before = self.scaler.get_scale()
        self.scaler.update()
        after = self.scaler.get_scale()
        if after != before:
            strategy.rescale_memory(after / before)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
