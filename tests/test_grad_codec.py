"""Downlink gradient codecs: exactness / error bounds, exact sizes, malformed payloads.

Every registered codec that serves the ``gradient`` stream is tested here (the cases come
from the registry); the ones known below also get their own exactness or error bound."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SCRATCH
from sim.compress import codec_names, get_codec, make_codec
from sim.compress.base import PayloadError
from sim.compress.codecs.nf import qlora_codebook
from sim.config import ConfigError, SplitConfig

SHAPE = (2, 6, 128)
GRAD_CODECS = codec_names("gradient")


def bit_cases(name):
    """The widths to test a gradient codec at: its one width when ``bits`` is unused, else
    1, 2, 4, 8 within its bit range."""
    cls = get_codec(name)
    lo, hi = cls.bit_range
    if cls.bit_unit is None:
        return [hi]
    return sorted({min(max(b, lo), hi) for b in (1, 2, 4, 8)})


CASES = [(name, bits) for name in GRAD_CODECS for bits in bit_cases(name)]


def codec(name, bits):
    return make_codec(name, 0, bits)  # a gradient codec reads the shape from the gradient


def nbytes(arrays):
    return sum(a.nbytes for a in arrays.values())


def layout_nbytes(layout):
    return sum(np.dtype(a.dtype).itemsize * a.count for a in layout.values())


def formula_nbytes(name, shape, bits):
    """Independent byte counts of the codecs documented in docs/compressors.md."""
    n, dim = math.prod(shape), shape[-1]
    rows = n // dim
    if name == "none":
        return 4 * n
    if name == "fp16":
        return 2 * n
    if name == "topk":  # fp16 values + the cheaper of bitmask / index list + 1 format byte
        k = round(bits / 16 * dim)
        return 2 * rows * k + min(math.ceil(rows * dim / 8), math.ceil(rows * k * math.ceil(math.log2(dim)) / 8)) + 1
    if name == "nf":  # zero-padded to blocks of 64: packed codes + one fp16 absmax per block
        blocks = -(-n // 64)
        return math.ceil(blocks * 64 * bits / 8) + 2 * blocks
    if name == "bf16":
        return 2 * n
    if name == "stochastic":  # packed codes + fp16 min and range per token (the default scale)
        return math.ceil(n * bits / 8) + 4 * rows
    if name == "lowrank":  # (N + D) * r fp16 values per matrix, r = min(4, N, D) (the default rank)
        mats, tokens = (math.prod(shape[:-2]), shape[-2]) if len(shape) >= 3 else (1, shape[0])
        return 2 * mats * (tokens + dim) * min(4, tokens, dim)
    return None


def check_none(g, out, bits):
    assert torch.equal(out, g)


def check_fp16(g, out, bits):
    assert torch.equal(out, g.half().float())


def check_topk(g, out, bits):
    k = round(bits / 16 * g.shape[-1])
    kept = out != 0
    assert (kept.sum(-1) == k).all() and torch.equal(out[kept], g[kept].half().float())
    kth = g.abs().topk(k, dim=-1).values[..., -1:]
    assert (g.abs() * ~kept <= kth).all()


def check_nf(g, out, bits):
    blocks, err = g.reshape(-1, 64), (out - g).reshape(-1, 64)
    cb = qlora_codebook(bits)
    radius = max(float(((cb[1:] - cb[:-1]) / 2).max()), float(cb.min()) + 1)
    amax = blocks.abs().amax(-1, keepdim=True)
    assert (err.abs() <= radius * amax * (1 + 2**-9) + 1e-9).all()


def check_bf16(g, out, bits):
    assert torch.equal(out, g.bfloat16().float())


SPECIFIC = {"none": check_none, "fp16": check_fp16, "bf16": check_bf16, "topk": check_topk, "nf": check_nf}


def check_error(name, g, out):
    """A biased codec is never worse than sending zeros; an unbiased one (stochastic
    rounding) trades that for zero mean error, so its error is bounded in variance (its
    own test file) and here only by the group ranges: at most the range of the tensor."""
    if get_codec(name).unbiased:
        assert ((out - g).abs() <= (g.max() - g.min()) * (1 + 1e-3) + 1e-30).all()
    else:
        assert (out - g).norm() <= g.norm() * (1 + 1e-3)  # never worse than sending zeros


def test_cases_cover_every_gradient_codec():
    assert {name for name, _ in CASES} == set(GRAD_CODECS)
    assert {"none", "fp16", "bf16", "stochastic", "lowrank", "topk", "nf"} <= set(GRAD_CODECS)
    for name in GRAD_CODECS:
        assert "gradient" in get_codec(name).streams


@pytest.mark.parametrize("name,bits", CASES)
def test_roundtrip_and_exact_size(name, bits):
    c = codec(name, bits)
    g = torch.randn(SHAPE) * 1e-3
    arrays = c.encode_gradient(g)
    out = c.decode_gradient(arrays, SHAPE)
    assert out.shape == SHAPE and out.dtype == torch.float32
    layout = c.gradient_layout(SHAPE)
    assert {k: (a.dtype, a.shape) for k, a in arrays.items()} == {
        k: (np.dtype(w.dtype), (w.count,)) for k, w in layout.items()}
    assert nbytes(arrays) == layout_nbytes(layout)
    expected = formula_nbytes(name, SHAPE, bits)
    if expected is not None:
        assert nbytes(arrays) == expected
    check_error(name, g, out)
    if name in SPECIFIC:
        SPECIFIC[name](g, out, bits)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(3, 5, 16), (1, 7, 100), (4, 130), (2, 2, 64)]), name=st.sampled_from(GRAD_CODECS),
    data=st.data(), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-6, 1e3),
)
def test_any_shape_roundtrips(shape, name, data, seed, scale):
    lo, hi = get_codec(name).bit_range
    bits = data.draw(st.integers(lo, min(hi, 8)), label="bits")
    c = codec(name, bits)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    arrays = c.encode_gradient(g)
    out = c.decode_gradient(arrays, shape)
    assert out.shape == shape and torch.isfinite(out).all()
    assert nbytes(arrays) == layout_nbytes(c.gradient_layout(shape))
    expected = formula_nbytes(name, shape, bits)
    if expected is not None:
        assert nbytes(arrays) == expected
    check_error(name, g, out)


def test_fp16_saturates_instead_of_overflowing():
    c = codec("fp16", 16)
    g = torch.tensor([1e6, -1e6, 1.0]).reshape(1, 1, 3)
    out = c.decode_gradient(c.encode_gradient(g), g.shape)
    assert torch.equal(out.reshape(-1), torch.tensor([65504.0, -65504.0, 1.0]))


def test_compression_actually_compresses():
    fp16 = layout_nbytes(codec("fp16", 16).gradient_layout(SHAPE))
    assert fp16 == layout_nbytes(codec("none", 16).gradient_layout(SHAPE)) / 2
    assert layout_nbytes(codec("nf", 4).gradient_layout(SHAPE)) < fp16 / 3
    assert layout_nbytes(codec("topk", 1).gradient_layout(SHAPE)) < fp16 / 4


@pytest.mark.parametrize("name,bits", CASES)
def test_malformed_payloads_raise_payload_error(name, bits):
    c = codec(name, bits)
    arrays = c.encode_gradient(torch.randn(SHAPE))
    assert torch.isfinite(c.decode_gradient(arrays, SHAPE)).all()  # the good payload decodes
    for key, good in arrays.items():
        other = np.int32 if good.dtype != np.int32 else np.int64
        for bad in (good[:-1], np.concatenate([good, good[:1]]), good.astype(other), good.reshape(1, -1)):
            with pytest.raises(PayloadError):
                c.decode_gradient({**arrays, key: bad}, SHAPE)
        with pytest.raises(PayloadError):
            c.decode_gradient({k: v for k, v in arrays.items() if k != key}, SHAPE)
        if good.dtype.kind == "f":
            nan = good.copy()
            nan[0] = np.nan
            with pytest.raises(PayloadError, match="NaN"):
                c.decode_gradient({**arrays, key: nan}, SHAPE)
    with pytest.raises(PayloadError):
        c.decode_gradient(arrays, (2, 7, 128))
    with pytest.raises(PayloadError):
        c.decode_gradient({**arrays, "side.junk": np.zeros(1, np.uint8)}, SHAPE)


def test_unknown_codec_and_bits():
    with pytest.raises(ValueError, match="unknown compressor"):
        make_codec("int8", 0, 8)
    with pytest.raises(ValueError):
        make_codec("nf", 0, 9)
    with pytest.raises(ConfigError):
        SplitConfig(grad_compressor="rdfsq")  # serves only the uplink streams
    with pytest.raises(ConfigError):
        SplitConfig(grad_compressor="int8")


def test_config_builds_the_gradient_codec():
    c = SplitConfig(grad_compressor="nf", grad_bits=4).grad_codec()
    assert c.name == "nf" and c.bits == 4
    g = torch.randn(SHAPE)
    ref = codec("nf", 4)
    got, want = c.encode_gradient(g), ref.encode_gradient(g)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert SplitConfig().grad_codec().name == "lowrank"  # the default job's (experiments/results/traffic.md)
    assert SplitConfig.from_run_config(SCRATCH).grad_codec().name == "none"  # the from-scratch regime: fp32
