"""The ``bf16`` gradient codec (sim/compress/codecs/bf16.py): bit patterns against an
independent NumPy rounding, its error bound, range, exact size, rejection of NaN/inf bit
patterns and malformed payloads, and that it crosses a real Flower message."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.compress import PayloadError, codec_names, make_codec
from sim.wire.arrays import arrays_to_record, record_to_arrays

from payload_checks import assert_rejects_malformed_gradient

SHAPE = (2, 6, 128)


def bf16_bits_numpy(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) on the bit patterns, from the
    format's definition: keep the top 16 bits after adding 0x7FFF + the kept lsb."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def codec():
    return make_codec("bf16", 0, 16)


def test_is_registered_for_the_gradient_only():
    assert "bf16" in codec_names("gradient") and "bf16" not in codec_names("image")


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mag=st.floats(1e-30, 1e30))
def test_bit_patterns_match_the_numpy_rounding_and_the_error_bound(seed, mag):
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * mag
    arrays = codec().encode_gradient(g)
    np.testing.assert_array_equal(arrays["codes.values"], bf16_bits_numpy(g.numpy().reshape(-1)))
    out = codec().decode_gradient(arrays, SHAPE)
    assert (torch.abs(out - g) <= torch.abs(g) * 2**-8).all()  # 8 significant bits, round to nearest


def test_two_bytes_per_value_and_no_fp16_underflow_or_saturation():
    g = torch.tensor([1e-30, -3e-12, 1e6, -2e20, 0.0, 1.0]).reshape(1, 1, 6)
    arrays = codec().encode_gradient(g)
    assert arrays["codes.values"].dtype == np.uint16 and arrays["codes.values"].nbytes == 2 * g.numel()
    out = codec().decode_gradient(arrays, g.shape)
    assert ((out - g).abs() <= g.abs() * 2**-8).all() and (out[g != 0] != 0).all()
    big = torch.tensor([3.4e38, -3.4e38]).reshape(1, 1, 2)  # beyond bf16's largest finite value: saturates
    assert torch.isfinite(codec().decode_gradient(codec().encode_gradient(big), big.shape)).all()


def test_nan_and_inf_bit_patterns_are_rejected():
    arrays = codec().encode_gradient(torch.randn(SHAPE))
    for pattern in (0x7FC0, 0x7F80, 0xFF80):  # NaN, +inf, -inf
        bad = arrays["codes.values"].copy()
        bad[3] = pattern
        with pytest.raises(PayloadError, match="NaN or inf"):
            codec().decode_gradient({"codes.values": bad}, SHAPE)


def test_malformed_payloads_raise_payload_error():
    assert_rejects_malformed_gradient(codec(), torch.randn(SHAPE) * 1e-3)


def test_crosses_a_flower_array_record():
    """Flower's Array cannot hold a bfloat16 tensor; the uint16 bit patterns it can."""
    with pytest.raises(TypeError, match="BFloat16"):
        ArrayRecord({"x": Array.from_torch_tensor(torch.zeros(3, dtype=torch.bfloat16))})
    g = torch.randn(SHAPE)
    back = record_to_arrays(arrays_to_record(codec().encode_gradient(g)))
    assert torch.equal(codec().decode_gradient(back, SHAPE), g.bfloat16().float())
