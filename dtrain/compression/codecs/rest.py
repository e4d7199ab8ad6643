"""`LossyRest`: the dense rest of a dAD-family model (biases, LayerNorms, embeddings, uncaptured layers) in 16 or
8 bits (`comm.rest_dtype` bf16/fp16, or int8/fp8). Lossy, with error feedback.

The rest's gradients travel as one flat vector per rank. With error feedback each rank keeps what its own
encoding dropped (`memory.ErrorFeedback`: compensated = delivered + residual) and adds it to the next step's
vector; a step whose sum is not finite (skipped by the trainer) leaves the residual as it was. How the vectors
are combined depends on the format and on S:

- 16 bits, S ≤ 2: one all-gather, and every rank sums the S vectors in fp32 in rank order (bitwise the same mean
  on every rank); wire (S−1) × payload, equal to a ring all-reduce's at S = 2;
- 16 bits, S > 2: one 16-bit ring all-reduce, wire 2(S−1)/S × payload instead of the all-gather's (S−1) ×, so
  the rest does not grow with the world size. The sum then runs in 16 bits on the wire: what its rounding drops
  belongs to no rank and is not fed back (each rank's own cast still is);
- 8 bits, any S: `Comm.all_reduce_quantized_async` (1 byte per value plus a scale per block, wire 2(S−1)/S ×
  payload). Each rank knows what its encodings lost (`delivered()`), so the residuals absorb all of it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..buckets import grad_or_zeros
from ..comm import Comm
from ..dtypes import QUANTIZED, wire_dtype
from ..memory import ErrorFeedback

#: the residual's key, in the codec's memory and in checkpoints
RESIDUAL = "rest_residual"


class LossyRest:
    def __init__(self, params: list[tuple[str, nn.Parameter]], fmt: str, error_feedback: bool, prefix: str) -> None:
        self.params = params
        self.fmt = fmt
        self.error_feedback = error_feedback
        self.prefix = prefix
        self.memory = ErrorFeedback()
        # the collective's name in the per-layer bytes: the 16-bit ones keep torch's dtype name, as before 8 bits
        self.label = f"{prefix}/{fmt if fmt in QUANTIZED else str(wire_dtype(fmt)).split('.')[-1]}"

    def __call__(self, comm: Comm) -> None:
        if not self.params:
            return
        grads = [grad_or_zeros(p) for _, p in self.params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        residual = self.memory.get(RESIDUAL)
        if residual is not None and residual.shape != flat.shape:
            raise ValueError(
                f"{self.prefix}: error-feedback residual of {residual.numel()} elements for "
                f"{flat.numel()} gradient elements (state from another model?)"
            )
        compensated = self.memory.compensate(RESIDUAL, flat)
        if self.fmt in QUANTIZED:
            handle = comm.all_reduce_quantized_async(compensated, self.label, self.fmt)
            total, delivered = handle.wait().clone(), handle.delivered()
        else:
            sent = compensated.to(wire_dtype(self.fmt))
            delivered = sent.to(torch.float32)
            total = self._sum_16_bit(comm, sent, self.label)
        # decided on the sum, the same on every rank: a NaN on one rank reaches the others' delivered shares through
        # the 8-bit sum's second encoding, and the step is skipped everywhere anyway
        if self.error_feedback and bool(torch.isfinite(total).all()):
            self.memory.update(RESIDUAL, compensated, delivered)
        total /= comm.world_size
        for g, chunk in zip(grads, total.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))

    @staticmethod
    def _sum_16_bit(comm: Comm, sent: torch.Tensor, name: str) -> torch.Tensor:
        """The fp32 sum over ranks of a 16-bit vector: all-gathered and summed in rank order at S ≤ 2, a 16-bit
        ring all-reduce beyond."""
        if comm.world_size > 2:
            return comm.all_reduce_(sent, name).to(torch.float32)
        parts = comm.all_gather(sent, name)
        total = parts[0].to(torch.float32)
        for part in parts[1:]:
            total += part.to(torch.float32)
        return total

    def state_dict(self) -> dict[str, Any]:
        residual = self.memory.get(RESIDUAL)
        return {} if residual is None else {RESIDUAL: residual.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict({RESIDUAL: state[RESIDUAL]} if state.get(RESIDUAL) is not None else {})
