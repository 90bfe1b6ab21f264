"""Bit packing of b-bit integer codes into ``uint8`` buffers (b = 1..16).

Codes are laid out little-endian bit by bit: code ``i`` occupies bits
``[i*b, (i+1)*b)`` of the buffer, bit 0 of a byte first. ``n`` codes take exactly
``ceil(n*b/8)`` bytes, so the payload is the ideal ``n*log2(2^b)`` bits plus at
most 7 bits of padding.
"""

from __future__ import annotations

import numpy as np

from .base import PayloadError


class PackError(ValueError):
    """A packed buffer that does not match what the receiver expects."""


def unpack_codes(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """:func:`unpack_bits` of a peer's payload: a malformed buffer is a ``PayloadError``."""
    try:
        return unpack_bits(buf, bits, count)
    except PackError as err:
        raise PayloadError(str(err)) from None


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise PackError(f"bits must be in 1..16, got {bits}")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer ``codes`` (any shape) into a flat ``uint8`` array."""
    _check_bits(bits)
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise PackError(f"codes out of range for {bits} bits: [{flat.min()}, {flat.max()}]")
    if bits == 16:
        return flat.astype("<u2").view(np.uint8).copy()
    if bits > 8:
        bitplanes = (flat.astype(np.uint16)[:, None] >> np.arange(bits, dtype=np.uint16)) & np.uint16(1)
        return np.packbits(bitplanes.astype(np.uint8).reshape(-1), bitorder="little")
    if bits == 8:
        return flat.astype(np.uint8)  # always a copy: never aliases the caller's codes
    flat = flat.astype(np.uint8, copy=False)  # in range, so exact
    if 8 % bits == 0:  # 1, 2, 4 bits: several whole codes per byte, OR-ed column by column
        per = 8 // bits
        if flat.size % per:
            flat = np.concatenate([flat, np.zeros(per - flat.size % per, dtype=np.uint8)])
        groups = flat.reshape(-1, per)
        out = groups[:, 0].copy()
        for j in range(1, per):
            out |= groups[:, j] << np.uint8(j * bits)
        return out
    bitplanes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(bitplanes.reshape(-1), bitorder="little")


def _unpack_table(bits: int) -> np.ndarray:
    """``table[byte]`` = the ``8 // bits`` codes packed in ``byte`` (bits in 1, 2, 4)."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    return (np.arange(256, dtype=np.uint8)[:, None] >> shifts) & np.uint8((1 << bits) - 1)


_UNPACK_TABLES = {b: _unpack_table(b) for b in (1, 2, 4)}


def unpack_bits(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes as ``int64``; validates the length."""
    _check_bits(bits)
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise PackError(f"packed codes must be a 1-D uint8 array, got {getattr(buf, 'dtype', type(buf))}")
    if count < 0:
        raise PackError(f"negative code count {count}")
    expected = packed_nbytes(count, bits)
    if buf.size != expected:
        raise PackError(f"packed codes have {buf.size} bytes, expected {expected} for {count}x{bits} bits")
    if bits == 8:
        return buf.astype(np.int64)
    if bits == 16:
        return buf.view("<u2").astype(np.int64)
    if 8 % bits == 0:
        return _UNPACK_TABLES[bits][buf].reshape(-1)[:count].astype(np.int64)
    bitplanes = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count, bits)
    return bitplanes.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))
