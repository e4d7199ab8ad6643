"""The wire formats of compressed tensors (`comm.factor_dtype`, `comm.rest_dtype`). Arithmetic stays fp32: the
16-bit and 8-bit types are for the wire only (QR, for one, has no half-precision kernels).

- fp32, bf16, fp16: a cast;
- int8, fp8 (e4m3): 8 bits per value with one fp32 scale per column, for the factors of rank-dAD's all-gather
  forms. A column c is sent as round(x / s_c) in int8 with s_c = max|x_c| / 127, or as x / s_c in e4m3 with
  s_c = max|x_c| / 448 (e4m3's largest finite value), so the largest entry of each column keeps its full
  precision and a column of zeros stays zeros. Gathered as sent by rank-dAD's all-gather forms; summed forms
  cannot add 8-bit values with per-rank scales in place (the sum overflows, the scales differ), so they send
  them through `Comm.all_reduce_quantized_async`, whose columns are blocks of at most `QUANT_BLOCK` values.
"""

from __future__ import annotations

import torch

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: 8-bit formats: (storage dtype, largest magnitude a scaled value may take)
QUANTIZED = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
_SCALE_BYTES = 4  # one fp32 scale per column
#: the most values per fp32 scale in a summed 8-bit tensor (`Comm.all_reduce_quantized_async`): the scales add
#: at least 4/128 ≈ 3% to its bytes, and a block this small mostly sits inside one factor column
QUANT_BLOCK = 128


def wire_dtype(name: str) -> torch.dtype:
    """The dtype a tensor is cast to for the wire (a cast format: fp32, bf16, fp16)."""
    if name in QUANTIZED:
        raise ValueError(f"{name} is a scaled 8-bit format, sent with encode_columns, not a cast")
    return WIRE_DTYPES[name]


def element_size(name: str) -> int:
    return QUANTIZED[name][0].itemsize if name in QUANTIZED else WIRE_DTYPES[name].itemsize


def summed_value_bytes(name: str) -> float:
    """Bytes per value of a large tensor summed over ranks in wire format `name` (8-bit: with the block scales)."""
    return element_size(name) + (_SCALE_BYTES / QUANT_BLOCK if name in QUANTIZED else 0.0)


def quantized_sum_bytes(name: str, numel: int, world_size: int) -> int:
    """Payload of `numel` values summed by `Comm.all_reduce_quantized_async` at world size S: S chunks of
    `quantized_layout` blocks, each block its 8-bit values and one fp32 scale."""
    blocks, size = quantized_layout(numel, world_size)
    return world_size * matrix_bytes(name, size, blocks)


def quantized_layout(numel: int, world_size: int) -> tuple[int, int]:
    """(blocks per chunk, values per block) when `numel` values are summed in 8 bits at world size S: each rank's
    chunk of ⌈numel / S⌉ values in as few equal blocks of at most `QUANT_BLOCK` values as hold it, so that the
    padding stays below one value per block (a fixed block size would pad a small tensor at a large S up to
    S blocks)."""
    chunk = max(1, -(-numel // world_size))
    blocks = -(-chunk // QUANT_BLOCK)
    return blocks, -(-chunk // blocks)


def matrix_bytes(name: str, rows: int, cols: int) -> int:
    """Bytes of a rows × cols matrix in wire format `name` (scales included)."""
    return rows * cols * element_size(name) + (cols * _SCALE_BYTES if name in QUANTIZED else 0)


def encode_columns(m: torch.Tensor, name: str) -> torch.Tensor:
    """A rows × cols fp32 matrix as flat uint8 bytes: cols fp32 scales, then the 8-bit values (row-major)."""
    storage, largest = QUANTIZED[name]
    m = m.float()
    scale = m.abs().amax(dim=0) / largest
    # a column of zeros gets scale 1; a NaN or inf scale stays, so the column decodes to non-finite values and the
    # step is seen as non-finite downstream (int8 would turn NaN into a finite 0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scaled = m / scale
    values = scaled.round().clamp_(-largest, largest).to(storage) if storage == torch.int8 else scaled.to(storage)
    return torch.cat([scale.contiguous().view(torch.uint8), values.contiguous().view(torch.uint8).reshape(-1)])


def decode_columns(data: torch.Tensor, name: str, rows: int, cols: int) -> torch.Tensor:
    """`encode_columns`' bytes back as the rows × cols fp32 matrix they stand for."""
    storage, _ = QUANTIZED[name]
    scale = data[: cols * _SCALE_BYTES].clone().view(torch.float32)  # a copy: `data` may sit at any byte offset
    values = data[cols * _SCALE_BYTES : cols * _SCALE_BYTES + rows * cols].view(storage).reshape(rows, cols)
    return values.float() * scale
