"""The wire dtypes of compressed tensors (`comm.factor_dtype`, `comm.rest_dtype`). Arithmetic stays fp32: the
16-bit types are for the wire only (QR, for one, has no half-precision kernels)."""

from __future__ import annotations

import torch

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def wire_dtype(name: str) -> torch.dtype:
    return WIRE_DTYPES[name]


def element_size(name: str) -> int:
    return WIRE_DTYPES[name].itemsize
