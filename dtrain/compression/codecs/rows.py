"""`RowsCodec`: dAD's codec (Baker et al., arXiv:2102.09631). Exact.

Each rank sends its (A_i, Δ_i) rows instead of its out×in weight gradient, packed side by side into one
(rows, in+out) tensor (one collective per layer) and padded to the most rows of any rank (padding is sent and
counted). Every rank all-gathers them and forms

    grad = [Δ_1; …; Δ_S]ᵀ [A_1; …; A_S] / S = Σ_i Δ_iᵀ A_i / S,

the all-reduce mean when each rank's loss is the mean over an equal share of the global batch.
Payload per layer: max_i N_i · (in + out) · 4 bytes (fp32), or · 2 under bf16/fp16 autocast, where the captured
rows are 16-bit (decoded in fp32).
"""

from __future__ import annotations

import torch

from ..comm import Comm
from .base import LayerCodec, LayerStep, Pending


class RowsCodec(LayerCodec):
    name = "dad"

    def launch(self, layer: LayerStep, comm: Comm) -> Pending:
        n_max = max(layer.rows)
        if n_max == 0:
            return Pending(layer, None)
        packed = torch.cat([layer.a, layer.delta], dim=1)
        if packed.shape[0] < n_max:
            packed = torch.cat([packed, packed.new_zeros((n_max - packed.shape[0], packed.shape[1]))])
        return Pending(layer, comm.all_gather_async(packed, layer.capture.name))

    def finish(self, pending: Pending, comm: Comm) -> torch.Tensor | None:
        if pending.gather is None:
            return None
        c, layer = pending.layer.capture, pending.layer
        parts = pending.gather.wait()
        # decoded in the weight's dtype (fp32), also when the rows travelled in 16 bits (autocast)
        rows = torch.cat([p[:n] for p, n in zip(parts, layer.rows)]).to(c.weight.dtype)
        a, delta = rows[:, : c.in_features], rows[:, c.in_features :]
        return (delta.T @ a).div_(comm.world_size)

    def wire_bytes(self, in_features: int, out_features: int, rows: int, world_size: int, row_bytes: int = 4) -> float:
        return float((world_size - 1) * rows * (in_features + out_features) * row_bytes)
