"""Bit packing of b-bit integer codes into ``uint8`` buffers (b = 1..16).

Codes are laid out little-endian bit by bit: code ``i`` occupies bits
``[i*b, (i+1)*b)`` of the buffer, bit 0 of a byte first. ``n`` codes take exactly
``ceil(n*b/8)`` bytes, so the payload is the ideal ``n*log2(2^b)`` bits plus at
most 7 bits of padding.
"""

from __future__ import annotations

import numpy as np


class PackError(ValueError):
    """A packed buffer that does not match what the receiver expects."""


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
    if bits == 8:
        return flat.astype(np.uint8)
    if bits == 16:
        return flat.astype("<u2").view(np.uint8).copy()
    if 8 % bits == 0:  # 1, 2, 4 bits: several whole codes per byte
        per = 8 // bits
        padded = np.zeros(-(-flat.size // per) * per, dtype=np.uint8)
        padded[: flat.size] = flat
        groups = padded.reshape(-1, per)
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        return np.bitwise_or.reduce(groups << shifts, axis=1).astype(np.uint8)
    bitplanes = (flat.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(bitplanes.astype(np.uint8).reshape(-1), bitorder="little")


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
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        vals = (buf[:, None] >> shifts) & np.uint8((1 << bits) - 1)
        return vals.reshape(-1)[:count].astype(np.int64)
    bitplanes = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count, bits)
    return bitplanes.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))
