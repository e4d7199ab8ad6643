"""The 8-bit wire formats of the factors (dtrain/compression/dtypes.py): sizes, and what a round trip keeps."""

from __future__ import annotations

import pytest
import torch

from dtrain.compression.comm import Comm
from dtrain.compression.dtypes import decode_columns, encode_columns, matrix_bytes


@pytest.mark.parametrize("name, rel_error", [("int8", 1 / 254), ("fp8", 1 / 16)])
def test_scaled_columns_round_trip_within_their_precision(name, rel_error):
    torch.manual_seed(0)
    m = torch.randn(300, 4) * torch.tensor([1e-6, 1.0, 1e3, 0.0])  # columns of very different scales, and zeros
    data = encode_columns(m, name)
    assert data.dtype == torch.uint8 and data.numel() == matrix_bytes(name, 300, 4) == 300 * 4 + 4 * 4
    back = decode_columns(data[0:], name, 300, 4)
    for c in range(3):  # each column keeps its own relative precision: one scale per column
        largest = m[:, c].abs().max()
        assert (back[:, c] - m[:, c]).abs().max() <= rel_error * largest * 1.01
    assert torch.equal(back[:, 3], torch.zeros(300))
    # decoding from an arbitrary byte offset (a part of a gathered buffer) gives the same values
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8), data])[3:]
    assert torch.equal(decode_columns(shifted, name, 300, 4), back)


def test_cast_formats_carry_no_scales():
    assert matrix_bytes("bf16", 10, 3) == 60 and matrix_bytes("fp32", 10, 3) == 120


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_makes_its_column_non_finite_not_zero(name, bad):
    m = torch.randn(10, 2)
    m[3, 1] = bad
    back = decode_columns(encode_columns(m, name), name, 10, 2)
    assert torch.isfinite(back[:, 0]).all()
    assert not torch.isfinite(back[:, 1]).all()


def test_an_8_bit_sum_of_a_nan_is_not_finite():
    """At world size 1 (no process group): the sum and this rank's delivered share keep the NaN."""
    t = torch.ones(300)
    t[7] = float("nan")
    handle = Comm().all_reduce_quantized_async(t, "test/nan", "int8")
    assert not torch.isfinite(handle.wait()).all()
    assert not torch.isfinite(handle.delivered()).all()
