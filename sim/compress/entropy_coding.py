"""Lossless entropy coding of integer code payloads (docs/compressors.md, "Entropy coding").

Quantized-TinyLLaVA (arXiv 2511.23402) derives the bit width from the source-coding bound (Shannon: a code needs
at least ``H`` bits per symbol on average) but sends fixed-width codes. This module
closes that gap for any codec whose payload is integer indices in ``[0, S)``:

* ``ans``: asymmetric numeral systems (Duda 2013) via ``constriction``'s
  ``stream.stack.AnsCoder`` with a ``Categorical`` model built from the message's
  exact histogram. The histogram travels as ``counts`` (one unsigned integer per
  symbol; uint8/uint16/uint32 chosen from the message length, which the receiver
  knows), the bit stream as ``words`` (uint32). The decoder re-checks the histogram
  of what it decoded against ``counts`` and that the stream is fully consumed, so a
  corrupted or truncated stream is rejected rather than silently mis-decoded.
* ``zstd``: Zstandard (RFC 8878) on the ``ceil(log2 S)``-bit packed codes.

Data flow: ``codes (n,) in [0, S) -> {counts, words} | {data} -> codes``.

On the uplink (run-config key ``entropy-coding``) :func:`wrap_index` replaces the
fixed-width ``codes.index`` array of a whole message (all its micro-batches, one
symbol model per message) by ``side.ans_counts`` + ``codes.ans_words`` or by
``codes.zstd``; :func:`unwrap_index` restores the per-micro-batch packed arrays
before the codec decodes them. The ledger counts what is really sent.
"""

from __future__ import annotations

import math

import constriction
import numpy as np
import zstandard

from .base import IndexLayout, PayloadError, require_array
from .packing import pack_bits, packed_nbytes, unpack_bits

METHODS = ("ans", "zstd")
MAX_SYMBOLS = 1 << 16


def symbol_bits(num_symbols: int) -> int:
    """Fixed width of one symbol in the packed (pre-entropy-coding) layout."""
    _check_symbols(num_symbols)
    return max(1, math.ceil(math.log2(num_symbols)))


def count_dtype(count: int) -> np.dtype:
    """Narrowest unsigned dtype that holds any histogram bin of a ``count``-symbol message."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if count <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"message of {count} symbols is too long for ANS histogram counts")


def empirical_entropy_bits(codes: np.ndarray, num_symbols: int) -> float:
    """``n * H(p_hat)`` in bits, with ``p_hat`` the message's own histogram."""
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=num_symbols).astype(np.float64)
    n = counts.sum()
    if n == 0:
        return 0.0
    p = counts[counts > 0] / n
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def encoded_nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def _check_symbols(num_symbols: int) -> None:
    if not 2 <= num_symbols <= MAX_SYMBOLS:
        raise ValueError(f"num_symbols must be in 2..{MAX_SYMBOLS}, got {num_symbols}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"entropy coding method must be one of {METHODS}, got {method!r}")


def _model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def entropy_encode(codes: np.ndarray, num_symbols: int, method: str = "ans", level: int = 3) -> dict[str, np.ndarray]:
    """Losslessly encode integer ``codes`` (any shape, values in ``[0, num_symbols)``)."""
    _check_symbols(num_symbols)
    _check_method(method)
    flat = np.asarray(codes).reshape(-1)
    if flat.dtype.kind not in "iu":
        raise ValueError(f"codes must be integers, got dtype {flat.dtype}")
    if flat.size and (flat.min() < 0 or flat.max() >= num_symbols):
        raise ValueError(f"codes out of range [0, {num_symbols}): [{flat.min()}, {flat.max()}]")
    if method == "zstd":
        packed = pack_bits(flat, symbol_bits(num_symbols))
        data = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(packed.tobytes())
        return {"data": np.frombuffer(data, dtype=np.uint8).copy()}
    counts = np.bincount(flat, minlength=num_symbols)
    coder = constriction.stream.stack.AnsCoder()
    if flat.size:
        coder.encode_reverse(flat.astype(np.int32), _model(counts))
    return {"counts": counts.astype(count_dtype(flat.size)), "words": coder.get_compressed().astype(np.uint32)}


def _words(arrays: dict[str, np.ndarray], count: int) -> np.ndarray:
    if "words" not in arrays:
        raise PayloadError("payload is missing array 'words'")
    w = arrays["words"]
    if not isinstance(w, np.ndarray) or w.dtype != np.uint32 or w.ndim != 1:
        raise PayloadError(f"payload array 'words' must be 1-D uint32, got {getattr(w, 'dtype', type(w))}")
    # the model has 24-bit precision, so no symbol costs more than 24 bits
    if w.size > (count * 24 + 31) // 32 + 2:
        raise PayloadError(f"payload array 'words' is too long ({w.size} words for {count} symbols)")
    return w


def _decode_ans(arrays: dict[str, np.ndarray], num_symbols: int, count: int) -> np.ndarray:
    counts = require_array(arrays, "counts", count_dtype(count), num_symbols)
    if int(counts.sum(dtype=np.int64)) != count:
        raise PayloadError(f"ANS histogram sums to {int(counts.sum(dtype=np.int64))}, expected {count} symbols")
    words = _words(arrays, count)
    if count == 0:
        if words.size:
            raise PayloadError("ANS stream has data but the message is empty")
        return np.zeros(0, dtype=np.int64)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = coder.decode(_model(counts), count)
        empty = coder.is_empty()
    except Exception as err:  # constriction reports malformed input as ValueError/RuntimeError
        raise PayloadError(f"ANS stream is corrupt: {err}") from None
    out = np.asarray(out, dtype=np.int64)
    if out.size != count or (out.size and (out.min() < 0 or out.max() >= num_symbols)):
        raise PayloadError("ANS stream decoded to out-of-range symbols")
    if not empty or not np.array_equal(np.bincount(out, minlength=num_symbols), counts.astype(np.int64)):
        raise PayloadError("ANS stream is corrupt or truncated (histogram/length mismatch)")
    return out


def _decode_zstd(arrays: dict[str, np.ndarray], num_symbols: int, count: int) -> np.ndarray:
    if "data" not in arrays:
        raise PayloadError("payload is missing array 'data'")
    data = arrays["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        raise PayloadError(f"payload array 'data' must be 1-D uint8, got {getattr(data, 'dtype', type(data))}")
    bits = symbol_bits(num_symbols)
    expected = packed_nbytes(count, bits)
    raw = data.tobytes()
    try:
        size = zstandard.get_frame_parameters(raw).content_size
        if size != expected:
            raise PayloadError(f"zstd frame holds {size} bytes, expected {expected}")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        packed = dobj.decompress(raw)
        if not dobj.eof or dobj.unused_data or len(packed) != expected:
            raise PayloadError("zstd frame is truncated, has trailing data or the wrong length")
    except zstandard.ZstdError as err:
        raise PayloadError(f"zstd frame is corrupt: {err}") from None
    out = unpack_bits(np.frombuffer(packed, dtype=np.uint8), bits, count)
    if out.size and out.max() >= num_symbols:
        raise PayloadError(f"zstd payload decoded symbol {out.max()} >= {num_symbols}")
    return out


def entropy_decode(arrays: dict[str, np.ndarray], num_symbols: int, count: int, method: str = "ans") -> np.ndarray:
    """Inverse of :func:`entropy_encode`: ``count`` symbols as int64; validates everything."""
    _check_symbols(num_symbols)
    _check_method(method)
    if count < 0:
        raise PayloadError(f"negative symbol count {count}")
    expected = {"counts", "words"} if method == "ans" else {"data"}
    if set(arrays) - expected:
        raise PayloadError(f"unexpected {method} arrays: {sorted(set(arrays) - expected)}")
    if method == "ans":
        return _decode_ans(arrays, num_symbols, count)
    return _decode_zstd(arrays, num_symbols, count)


# ----------------------------------------------------------------------------- messages
INDEX = "codes.index"
WRAPPED = {"ans": {"counts": "side.ans_counts", "words": "codes.ans_words"}, "zstd": {"data": "codes.zstd"}}


def _check_layouts(layouts: list[IndexLayout]) -> tuple[int, int, int]:
    """``(total codes, bits, alphabet)`` of micro-batches that share one alphabet."""
    if not layouts or any(lay is None for lay in layouts):
        raise ValueError("entropy coding needs the index layout of every micro-batch")
    bits, symbols = layouts[0][1], layouts[0][2]
    if any((lay[1], lay[2]) != (bits, symbols) for lay in layouts):
        raise ValueError("micro-batches of one message must share bit width and alphabet")
    return sum(lay[0] for lay in layouts), bits, symbols


def wrap_index(arrays: dict[str, np.ndarray], layouts: list[IndexLayout], method: str) -> dict[str, np.ndarray]:
    """Entropy-code the concatenated ``codes.index`` of several micro-batches.

    ``arrays[INDEX]`` is the concatenation of each micro-batch's packed buffer
    (``layouts[i] = (count, bits, alphabet)``); the result replaces it by the
    method's arrays and keeps every other array as it is."""
    _check_method(method)
    total, bits, symbols = _check_layouts(layouts)
    buf, codes, start = arrays[INDEX], [], 0
    for count, _, _ in layouts:
        size = packed_nbytes(count, bits)
        codes.append(unpack_bits(buf[start : start + size], bits, count))
        start += size
    if start != buf.size:
        raise ValueError(f"'{INDEX}' has {buf.size} bytes, the layouts need {start}")
    coded = entropy_encode(np.concatenate(codes) if codes else np.zeros(0, np.int64), symbols, method)
    out = {k: v for k, v in arrays.items() if k != INDEX}
    out.update({WRAPPED[method][k]: v for k, v in coded.items()})
    return out


def unwrap_index(arrays: dict[str, np.ndarray], layouts: list[IndexLayout], method: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`wrap_index`; validates the stream, raising :class:`PayloadError`."""
    _check_method(method)
    total, bits, symbols = _check_layouts(layouts)
    names = WRAPPED[method]
    if INDEX in arrays:
        raise PayloadError(f"entropy coding is '{method}' but the payload has a plain '{INDEX}' array")
    missing = [n for n in names.values() if n not in arrays]
    if missing:
        raise PayloadError(f"entropy-coded payload is missing {missing}")
    codes = entropy_decode({k: arrays[n] for k, n in names.items()}, symbols, total, method)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise PayloadError(f"entropy-coded symbol {int(codes.max())} does not fit {bits} bits")
    parts, start = [], 0
    for count, _, _ in layouts:
        parts.append(pack_bits(codes[start : start + count], bits))
        start += count
    out = {k: v for k, v in arrays.items() if k not in names.values()}
    out[INDEX] = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return out
