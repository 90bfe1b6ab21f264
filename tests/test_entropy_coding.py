"""Entropy coding of integer codes: exact round trips, near-entropy size, corrupt input."""

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.compress.base import PayloadError
from sim.compress.entropy_coding import (
    count_dtype, empirical_entropy_bits, encoded_nbytes, entropy_decode, entropy_encode, symbol_bits, unwrap_index,
    wrap_index,
)
from sim.compress.packing import pack_bits, unpack_bits

METHODS = ["ans", "zstd"]


def skewed(rng, n, num_symbols, decay=1.5):
    p = decay ** -np.arange(num_symbols, dtype=np.float64)
    return rng.choice(num_symbols, size=n, p=p / p.sum())


@pytest.mark.parametrize("p", [[0.7, 0.2, 0.07, 0.03], [0.4, 0.3, 0.2, 0.1], [0.97, 0.01, 0.01, 0.01]])
def test_ans_is_within_5_percent_of_the_empirical_entropy(p):
    codes = np.random.default_rng(0).choice(4, size=1 << 16, p=p)
    arrays = entropy_encode(codes, 4, "ans")
    ratio = encoded_nbytes(arrays) / (empirical_entropy_bits(codes, 4) / 8)
    assert ratio <= 1.05, ratio
    assert encoded_nbytes(arrays) < codes.size * 2 / 8  # beats the fixed 2-bit packing
    np.testing.assert_array_equal(entropy_decode(arrays, 4, codes.size, "ans"), codes)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8), n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["uniform", "skewed", "constant"]), method=st.sampled_from(METHODS),
)
def test_exact_roundtrip(bits, n, seed, kind, method):
    rng = np.random.default_rng(seed)
    S = 2**bits
    if kind == "uniform":
        codes = rng.integers(0, S, n)
    elif kind == "skewed":
        codes = skewed(rng, n, S)
    else:
        codes = np.full(n, rng.integers(0, S))
    arrays = entropy_encode(codes.astype(np.uint8 if bits <= 8 else np.int64), S, method)
    out = entropy_decode(arrays, S, n, method)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, codes)


@pytest.mark.parametrize("num_symbols", [2, 3, 5, 200, 256, 1000])
@pytest.mark.parametrize("method", METHODS)
def test_non_power_of_two_alphabets(num_symbols, method):
    codes = np.random.default_rng(1).integers(0, num_symbols, 5000)
    arrays = entropy_encode(codes, num_symbols, method)
    np.testing.assert_array_equal(entropy_decode(arrays, num_symbols, codes.size, method), codes)


def test_histogram_dtype_follows_message_length():
    assert count_dtype(255) == np.uint8 and count_dtype(256) == np.uint16 and count_dtype(1 << 16) == np.uint32
    arrays = entropy_encode(np.zeros(300, np.int64), 4, "ans")
    assert arrays["counts"].dtype == np.uint16 and arrays["counts"].size == 4


def test_encoder_rejects_bad_input():
    with pytest.raises(ValueError):
        entropy_encode(np.array([0, 4]), 4, "ans")
    with pytest.raises(ValueError):
        entropy_encode(np.array([0.5]), 4, "ans")
    with pytest.raises(ValueError):
        entropy_encode(np.array([0]), 1, "ans")
    with pytest.raises(ValueError):
        entropy_encode(np.array([0]), 4, "huffman")


def ans_cases(arrays):
    w, c = arrays["words"], arrays["counts"]
    flipped = w.copy()
    flipped[len(w) // 2] ^= np.uint32(1 << 13)
    zero_last = np.concatenate([w, np.zeros(1, np.uint32)])
    wrong_hist = c.copy()
    wrong_hist[0] += 1
    wrong_hist[1] -= 1
    return {
        "truncated-end": {"counts": c, "words": w[:-3]},
        "truncated-start": {"counts": c, "words": w[3:]},
        "flipped": {"counts": c, "words": flipped},
        "extra-word": {"counts": c, "words": np.concatenate([w, w[-1:]])},
        "zero-last-word": {"counts": c, "words": zero_last},
        "empty": {"counts": c, "words": w[:0]},
        "hist-sum": {"counts": c + np.uint32(1), "words": w},
        "hist-shifted": {"counts": wrong_hist, "words": w},
        "hist-dtype": {"counts": c.astype(np.uint16), "words": w},
        "hist-size": {"counts": c[:-1], "words": w},
        "words-dtype": {"counts": c, "words": w.astype(np.int64)},
        "words-huge": {"counts": c, "words": np.ones(100_000, np.uint32)},
        "missing-words": {"counts": c},
        "missing-counts": {"words": w},
        "unknown-array": {"counts": c, "words": w, "extra": w},
    }


def test_corrupt_ans_payloads_raise_payload_error():
    codes = skewed(np.random.default_rng(2), 70_000, 4)
    arrays = entropy_encode(codes, 4, "ans")
    assert arrays["counts"].dtype == np.uint32
    for why, bad in ans_cases(arrays).items():
        with pytest.raises(PayloadError):
            entropy_decode(bad, 4, codes.size, "ans")
            pytest.fail(why)


def test_random_garbage_never_crashes():
    rng = np.random.default_rng(3)
    codes = skewed(rng, 4000, 16)
    arrays = entropy_encode(codes, 16, "ans")
    for _ in range(50):
        w = rng.integers(1, 2**32, size=rng.integers(1, 2 * arrays["words"].size), dtype=np.uint32)
        try:
            out = entropy_decode({"counts": arrays["counts"], "words": w}, 16, codes.size, "ans")
        except PayloadError:
            continue
        assert out.min() >= 0 and out.max() < 16  # garbage that passes all checks is still in range
    for _ in range(50):
        data = rng.integers(0, 256, size=rng.integers(0, 400), dtype=np.uint8)
        with pytest.raises(PayloadError):
            entropy_decode({"data": data}, 16, codes.size, "zstd")


ZSTD_MAGIC = bytes([0x28, 0xB5, 0x2F, 0xFD])  # RFC 8878 section 3.1.1, little-endian 0xFD2FB528


def raw_zstd_frame(content: bytes) -> np.ndarray:
    """A zstd frame built by hand (RFC 8878): single segment, 4-byte content size, no
    checksum, one raw block (the content verbatim). Unlike a compressor's output, which
    byte holds what is known exactly."""
    assert len(content) < 128 * 1024
    descriptor = bytes([0b10_1_0_0_0_00])  # FCS 4 bytes, single segment, no checksum, no dictionary
    block = (1 | (0 << 1) | (len(content) << 3)).to_bytes(3, "little")  # last block, raw, size
    frame = ZSTD_MAGIC + descriptor + len(content).to_bytes(4, "little") + block + content
    return np.frombuffer(frame, np.uint8).copy()


def test_corrupt_zstd_payloads_raise_payload_error():
    codes = skewed(np.random.default_rng(4), 10_000, 4)
    data = entropy_encode(codes, 4, "zstd")["data"]
    assert data[:4].tobytes() == ZSTD_MAGIC
    bad_magic = data.copy()
    bad_magic[0] ^= 0xFF  # not a zstd frame any more
    reserved = data.copy()
    reserved[4] |= 0b0000_1000  # the frame header descriptor's reserved bit must be 0
    cases = {
        "magic": bad_magic,
        "reserved-bit": reserved,
        "truncated": data[:-4],
        "trailing": np.concatenate([data, data[:3]]),
        "header-only": data[:6],
        "empty": data[:0],
        "dtype": data.astype(np.int16),
        "rank": data.reshape(1, -1),
    }
    for why, bad in cases.items():
        with pytest.raises(PayloadError):
            entropy_decode({"data": bad}, 4, codes.size, "zstd")
            pytest.fail(why)
    with pytest.raises(PayloadError, match="corrupt"):
        entropy_decode({"data": bad_magic}, 4, codes.size, "zstd")
    with pytest.raises(PayloadError):
        entropy_decode({"data": data}, 4, codes.size + 8, "zstd")  # wrong length
    with pytest.raises(PayloadError):
        entropy_decode({}, 4, codes.size, "zstd")


def test_zstd_flipped_content_byte_decodes_to_the_flipped_symbols():
    """Without a checksum a flipped content byte is not detected: with 4 symbols every
    2-bit field is a valid symbol, so the decoder returns exactly the altered codes (the
    server's range checks are what is left); a wrong declared size is still refused."""
    codes = np.random.default_rng(6).integers(0, 4, 1000)
    packed = pack_bits(codes, 2)
    frame = raw_zstd_frame(packed.tobytes())
    np.testing.assert_array_equal(entropy_decode({"data": frame}, 4, codes.size, "zstd"), codes)
    flipped = frame.copy()
    flipped[-100] ^= 0xFF  # a content byte of the raw block: 4 symbols change
    out = entropy_decode({"data": flipped}, 4, codes.size, "zstd")
    changed = packed.copy()
    changed[-100] ^= 0xFF
    want = unpack_bits(changed, 2, codes.size)
    np.testing.assert_array_equal(out, want)
    assert (out != codes).sum() == 4 and out.min() >= 0 and out.max() < 4
    with pytest.raises(PayloadError, match="holds"):
        entropy_decode({"data": raw_zstd_frame(packed.tobytes()[:-1])}, 4, codes.size, "zstd")


def test_zstd_rejects_out_of_range_symbols():
    # 5 symbols take 3 bits, so 5..7 are representable but invalid
    packed = pack_bits(np.array([0, 1, 7, 4]), symbol_bits(5))
    data = np.frombuffer(zstandard.ZstdCompressor().compress(packed.tobytes()), np.uint8)
    with pytest.raises(PayloadError, match=">= 5"):
        entropy_decode({"data": data}, 5, 4, "zstd")


def test_empirical_entropy():
    assert empirical_entropy_bits(np.array([0, 1, 2, 3] * 10), 4) == pytest.approx(80.0)
    assert empirical_entropy_bits(np.zeros(100, np.int64), 4) == 0.0


# ---------------------------------------------------------------- whole messages (the uplink)
@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 12), counts=st.lists(st.integers(0, 300), min_size=1, max_size=5),
       seed=st.integers(0, 2**32 - 1), method=st.sampled_from(METHODS), skew=st.booleans())
def test_wrap_unwrap_restores_every_micro_batch_buffer(bits, counts, seed, method, skew):
    """Micro-batches of odd sizes (each packed buffer has its own padding) in one stream."""
    rng = np.random.default_rng(seed)
    parts = [skewed(rng, n, 2**bits) if skew else rng.integers(0, 2**bits, n) for n in counts]
    layouts = [(n, bits, 2**bits) for n in counts]
    plain = {"codes.index": np.concatenate([pack_bits(p, bits) for p in parts]), "side.scale": np.ones(3, np.float16)}
    wrapped = wrap_index(plain, layouts, method)
    assert "codes.index" not in wrapped and np.array_equal(wrapped["side.scale"], plain["side.scale"])
    back = unwrap_index(wrapped, layouts, method)
    assert set(back) == set(plain)
    np.testing.assert_array_equal(back["codes.index"], plain["codes.index"])


def test_wrap_rejects_inconsistent_layouts_and_unwrap_bad_streams():
    codes = np.random.default_rng(5).integers(0, 4, 100)
    plain = {"codes.index": pack_bits(codes, 2)}
    with pytest.raises(ValueError):
        wrap_index(plain, [(100, 2, 4), (10, 3, 8)], "ans")  # mixed widths
    with pytest.raises(ValueError):
        wrap_index(plain, [(90, 2, 4)], "ans")  # the buffer holds more than the layouts
    wrapped = wrap_index(plain, [(100, 2, 4)], "ans")
    with pytest.raises(PayloadError, match="plain"):
        unwrap_index({**wrapped, "codes.index": plain["codes.index"]}, [(100, 2, 4)], "ans")
    with pytest.raises(PayloadError, match="missing"):
        unwrap_index({"side.ans_counts": wrapped["side.ans_counts"]}, [(100, 2, 4)], "ans")
    with pytest.raises(PayloadError):
        unwrap_index(wrapped, [(101, 2, 4)], "ans")  # a different symbol count


def real_codes(compressor: str, bits: int) -> tuple[np.ndarray, int]:
    """Codes of real features: the tiny model's connector output on synthetic images."""
    import torch
    from conftest import scratch_cfg

    from sim.training.client import client_batch, client_runtime, micro_batch

    cfg = scratch_cfg(compressor=compressor, bits=bits, batch_size=8, num_samples=120, hidden_size=32, image_size=16,
                      patch_size=4, nf_block=32)
    rt = client_runtime(cfg, 0, 1)
    if rt.model.codec.needs_init:
        rt.model.init_codecs([client_batch(rt, micro_batch(rt, 0, s)) for s in range(2)])
    with torch.no_grad():
        enc = rt.model.codec(rt.model.features(client_batch(rt, micro_batch(rt, 1, 0)).pixels))
    return enc.codes.numpy().reshape(-1), rt.model.codec.index_layout(tuple(enc.y.shape))[2]


@pytest.mark.parametrize("compressor,bits", [("rdfsq", 2), ("fsq", 3), ("nf", 4), ("vq", 6)])
@pytest.mark.parametrize("method", METHODS)
def test_real_codes_round_trip(compressor, bits, method):
    codes, symbols = real_codes(compressor, bits)
    arrays = entropy_encode(codes, symbols, method)
    np.testing.assert_array_equal(entropy_decode(arrays, symbols, codes.size, method), codes)
    if method == "ans" and symbols <= 16:  # small alphabets: the histogram is negligible
        assert encoded_nbytes(arrays) <= 1.05 * empirical_entropy_bits(codes, symbols) / 8 + 64
