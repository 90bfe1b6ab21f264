"""Bit packing against an independent pure-Python bit-string reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.compress.packing import PackError, pack_bits, packed_nbytes, unpack_bits


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Little-endian bit order, written the slow obvious way."""
    stream = "".join(format(c, f"0{bits}b")[::-1] for c in codes)
    stream += "0" * (-len(stream) % 8)
    return bytes(int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8))


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_pack_matches_reference_and_round_trips(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=300))
    arr = np.asarray(codes, dtype=np.int64)
    packed = pack_bits(arr, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_nbytes(len(codes), bits)
    assert packed.tobytes() == reference_pack(codes, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, len(codes)), arr)


@pytest.mark.parametrize("bits", range(1, 9))
def test_multidimensional_shapes(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 5, 7))
    out = unpack_bits(pack_bits(codes, bits), bits, codes.size).reshape(codes.shape)
    np.testing.assert_array_equal(out, codes)


def test_exact_size_no_byte_per_code():
    assert packed_nbytes(64 * 128, 2) == 64 * 128 * 2 // 8
    assert pack_bits(np.zeros(8192, np.int64), 2).size == 2048


@pytest.mark.parametrize(
    "buf, bits, count",
    [
        (np.zeros(3, np.uint8), 2, 16),  # too short
        (np.zeros(5, np.uint8), 2, 16),  # too long
        (np.zeros(4, np.int32), 2, 16),  # wrong dtype
        (np.zeros((2, 2), np.uint8), 2, 16),  # wrong rank
        (np.zeros(4, np.uint8), 0, 16),  # bad bit width
        (np.zeros(4, np.uint8), 17, 16),
    ],
)
def test_malformed_buffers_raise(buf, bits, count):
    with pytest.raises(PackError):
        unpack_bits(buf, bits, count)


def test_out_of_range_codes_rejected_on_pack():
    with pytest.raises(PackError):
        pack_bits(np.array([0, 4]), 2)
    with pytest.raises(PackError):
        pack_bits(np.array([-1]), 3)
