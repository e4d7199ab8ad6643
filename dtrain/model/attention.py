"""Multi-head softmax attention pieces shared by the vanilla and the fixed-point layer, and the vanilla layer.

Both layers own exactly four projections named q, k, v, o (d_model x d_model; q, v, o with bias, k without), so
a checkpoint or a strategy that addresses parameters by name sees the same model whichever attention is configured.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, L, D] -> [B, H, L, D/H]"""
    batch, length, width = t.shape
    return t.view(batch, length, n_heads, width // n_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D/H] -> [B, L, D]"""
    batch, heads, length, head_dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * head_dim)


def key_padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An additive [B, 1, 1, L] bias that removes padded keys; None when nothing is padded.

    The most negative finite value (not -inf) keeps a fully padded row finite instead of NaN.
    """
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)[:, None, None, :]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | float
) -> torch.Tensor:
    """softmax(q kᵀ * scale + bias) v over heads: q, k, v [B, H, L, dh]; scale a float or [H, 1, 1]."""
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    return F.softmax(scores, dim=-1) @ v


class VanillaAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        # no key bias: it shifts every logit of a query by the same amount, so softmax ignores it and its
        # gradient is exactly 0 (only float noise, which Adam would amplify into steps)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        heads = self.n_heads
        scale = 1.0 / math.sqrt(x.shape[-1] // heads)
        mixed = attend(
            split_heads(self.q(x), heads),
            split_heads(self.k(x), heads),
            split_heads(self.v(x), heads),
            key_padding_bias(mask, x.dtype),
            scale,
        )
        return self.o(merge_heads(mixed))
