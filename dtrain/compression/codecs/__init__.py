"""Codecs: what a gradient sends, and how the received tensors become the gradient.

- per captured Linear layer (`LayerCodec`, base.py): `rows.RowsCodec` (dAD: the (A, Δ) rows, exact),
  `factors.FactorsCodec` (rank-dAD: k low-rank factors of Δᵀ A + error feedback);
- for the dense rest of the model (biases, norms, embeddings, uncaptured layers): `buckets.BucketedMean`
  (exact fp32 all-reduce, also the allreduce baseline) and `rest.LossyRest` (16 or 8 bits, error feedback).
"""

from .base import LayerCodec, LayerStep, Pending

__all__ = ["LayerCodec", "LayerStep", "Pending"]
