"""What a lossy codec remembers between steps, kept apart from the codec that fills it (GRACE's memory).

- `TensorMemory`: named tensors with `state_dict` (warm-start factors Q of PowerSGD and rank-dAD).
- `ErrorFeedback`: the one error-feedback memory of every lossy codec (PowerSGD's factors, rank-dAD's factors,
  the 16-bit rest of the dAD family).
- `StepUndo`: a step's memory before each update, restored if the step's decoded gradients are not finite.

Names are parameter or layer names, so a checkpoint stays readable and survives a change of bucketing.
"""

from __future__ import annotations

import torch


class TensorMemory:
    """Named tensors that persist across steps and go into checkpoints."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        return self._tensors.get(name)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._tensors[name] = tensor

    def drop(self, name: str) -> None:
        self._tensors.pop(name, None)

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

    The invariant, per rank and tensor, for every codec that uses it:

        compensated = delivered + new residual        where compensated = gradient + previous residual

    It holds exactly because the residual is defined as the difference; summed over steps, the gradients equal
    what was delivered plus the last residual. "Delivered" is this rank's own share of what the codec sent (its
    factors as cast to the wire dtype, its 16-bit vector), plus anything the codec's decoding dropped again.

    Residuals differ between ranks (each holds its own error): they are checkpointed per rank.
    """

    def compensate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """gradient + residual, as a new tensor (the caller may overwrite `grad` afterwards)."""
        residual = self.get(name)
        return grad.clone() if residual is None else grad + residual

    def compensate_product(self, name: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """left @ right + residual in one fused product: the gradient given by its factors (Δᵀ A)."""
        residual = self.get(name)
        return left @ right if residual is None else torch.addmm(residual.to(left.dtype), left, right)

    def rescale_(self, ratio: float) -> None:
        """Every residual × ratio: the gradients it is added to changed units (fp16 loss scaling)."""
        for residual in self._tensors.values():
            residual.mul_(ratio)

    def update(self, name: str, compensated: torch.Tensor, delivered: torch.Tensor) -> None:
        """Remember what `compensated` lost on its way to `delivered`."""
        self.put(name, compensated - delivered)

    def update_factored_(self, name: str, compensated: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """`update` for delivered = p qᵀ, computed in place in `compensated` (no second out×in buffer).
        Returns the residual, which the caller may still adjust in place (rank-dAD's two-way recompression)."""
        residual = compensated.addmm_(p, q.T, alpha=-1.0)
        self.put(name, residual)
        return residual


class StepUndo:
    """What a step changed in some memories, to take back if the step turns out non-finite (the trainer's
    nan_policy then skips it), instead of poisoning every later step with NaN residuals or warm starts.

    Per layer: `remember(name)` before the memories are updated, `decoded(grad)` for the gradient delivered.
    `end_step()` makes ONE fused finiteness check (one host sync per step, not one per layer) and restores what
    was remembered if any decoded gradient holds a NaN or Inf. The decoded gradients are the same on every rank,
    so all ranks decide alike."""

    def __init__(self, *memories: TensorMemory) -> None:
        self.memories = memories
        self._before: list[tuple[str, list[torch.Tensor | None]]] = []
        self._sums: list[torch.Tensor] = []

    def remember(self, name: str) -> None:
        self._before.append((name, [memory.get(name) for memory in self.memories]))

    def decoded(self, grad: torch.Tensor) -> None:
        self._sums.append(grad.sum())

    def end_step(self) -> None:
        if self._sums and not bool(torch.isfinite(torch.stack(self._sums)).all()):
            for name, before in reversed(self._before):
                for memory, tensor in zip(self.memories, before):
                    if tensor is None:
                        memory.drop(name)
                    else:
                        memory.put(name, tensor)
        self._before, self._sums = [], []
