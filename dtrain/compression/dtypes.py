"""The wire formats of compressed tensors (`comm.factor_dtype`, `comm.rest_dtype`). Arithmetic stays fp32: the
16-bit and 8-bit types are for the wire only (QR, for one, has no half-precision kernels).

- fp32, bf16, fp16: a cast;
- int8, fp8 (e4m3): 8 bits per value with one fp32 scale per column, for the factors of rank-dAD's all-gather
  forms. A column c is sent as round(x / s_c) in int8 with s_c = max|x_c| / 127, or as x / s_c in e4m3 with
  s_c = max|x_c| / 448 (e4m3's largest finite value), so the largest entry of each column keeps its full
  precision and a column of zeros stays zeros. Only for codecs that gather each rank's tensor as it was sent: an
  all-reduce would have to sum int8 values, which overflows, and scales that differ between ranks.
"""

from __future__ import annotations

import torch

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: 8-bit formats: (storage dtype, largest magnitude a scaled value may take)
QUANTIZED = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
_SCALE_BYTES = 4  # one fp32 scale per column


def wire_dtype(name: str) -> torch.dtype:
    """The dtype a tensor is cast to for the wire (a cast format: fp32, bf16, fp16)."""
    if name in QUANTIZED:
        raise ValueError(f"{name} is a scaled 8-bit format, sent with encode_columns, not a cast")
    return WIRE_DTYPES[name]


def element_size(name: str) -> int:
    return QUANTIZED[name][0].itemsize if name in QUANTIZED else WIRE_DTYPES[name].itemsize


def matrix_bytes(name: str, rows: int, cols: int) -> int:
    """Bytes of a rows × cols matrix in wire format `name` (scales included)."""
    return rows * cols * element_size(name) + (cols * _SCALE_BYTES if name in QUANTIZED else 0)


def encode_columns(m: torch.Tensor, name: str) -> torch.Tensor:
    """A rows × cols fp32 matrix as flat uint8 bytes: cols fp32 scales, then the 8-bit values (row-major)."""
    storage, largest = QUANTIZED[name]
    m = m.float()
    scale = m.abs().amax(dim=0) / largest
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = m / scale
    values = scaled.round().clamp_(-largest, largest).to(storage) if storage == torch.int8 else scaled.to(storage)
    return torch.cat([scale.contiguous().view(torch.uint8), values.contiguous().view(torch.uint8).reshape(-1)])


def decode_columns(data: torch.Tensor, name: str, rows: int, cols: int) -> torch.Tensor:
    """`encode_columns`' bytes back as the rows × cols fp32 matrix they stand for."""
    storage, _ = QUANTIZED[name]
    scale = data[: cols * _SCALE_BYTES].clone().view(torch.float32)  # a copy: `data` may sit at any byte offset
    values = data[cols * _SCALE_BYTES : cols * _SCALE_BYTES + rows * cols].view(storage).reshape(rows, cols)
    return values.float() * scale
