"""Downlink gradient codec: exactness / error bounds, exact sizes, malformed payloads."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.compress.base import PayloadError
from sim.compress.grad_codec import decode_grads, encode_grads, grad_nbytes
from sim.compress.nf import qlora_codebook

SHAPE = (2, 6, 128)
CASES = [("none", 32), ("fp16", 16)] + [("topk", b) for b in (1, 2, 4, 8)] + [("nf", b) for b in (1, 2, 4, 8)]


def nbytes(arrays):
    return sum(a.nbytes for a in arrays.values())


@pytest.mark.parametrize("method,bits", CASES)
def test_roundtrip_and_exact_size(method, bits):
    g = torch.randn(SHAPE) * 1e-3
    arrays = encode_grads(g, method, bits)
    out = decode_grads(arrays, SHAPE, method, bits)
    assert out.shape == SHAPE and out.dtype == torch.float32
    assert nbytes(arrays) == grad_nbytes(SHAPE, method, bits)
    if method == "none":
        assert torch.equal(out, g) and nbytes(arrays) == 4 * g.numel()
    elif method == "fp16":
        assert torch.equal(out, g.half().float()) and nbytes(arrays) == 2 * g.numel()
    elif method == "topk":
        k = round(bits / 16 * SHAPE[-1])
        kept = out != 0
        assert (kept.sum(-1) == k).all() and torch.equal(out[kept], g[kept].half().float())
        kth = g.abs().topk(k, dim=-1).values[..., -1:]
        assert (g.abs() * ~kept <= kth).all()
    else:
        blocks, err = g.reshape(-1, 64), (out - g).reshape(-1, 64)
        cb = qlora_codebook(bits)
        radius = max(float(((cb[1:] - cb[:-1]) / 2).max()), float(cb.min()) + 1)
        amax = blocks.abs().amax(-1, keepdim=True)
        assert (err.abs() <= radius * amax * (1 + 2**-9) + 1e-9).all()


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(3, 5, 16), (1, 7, 100), (4, 130), (2, 2, 64)]), method=st.sampled_from(["fp16", "topk", "nf"]),
    bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-6, 1e3),
)
def test_any_shape_roundtrips(shape, method, bits, seed, scale):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    arrays = encode_grads(g, method, bits)
    out = decode_grads(arrays, shape, method, bits)
    assert out.shape == shape and torch.isfinite(out).all()
    assert nbytes(arrays) == grad_nbytes(shape, method, bits)
    assert (out - g).norm() <= g.norm() * (1 + 1e-3)  # never worse than sending zeros


def test_fp16_saturates_instead_of_overflowing():
    g = torch.tensor([1e6, -1e6, 1.0]).reshape(1, 1, 3)
    out = decode_grads(encode_grads(g, "fp16", 16), g.shape, "fp16", 16)
    assert torch.equal(out.reshape(-1), torch.tensor([65504.0, -65504.0, 1.0]))


def test_compression_actually_compresses():
    assert grad_nbytes(SHAPE, "nf", 4) < grad_nbytes(SHAPE, "fp16", 16) / 3
    assert grad_nbytes(SHAPE, "topk", 1) < grad_nbytes(SHAPE, "fp16", 16) / 4


@pytest.mark.parametrize("method,bits", CASES)
def test_malformed_payloads_raise_payload_error(method, bits):
    arrays = encode_grads(torch.randn(SHAPE), method, bits)
    for key, good in arrays.items():
        other = np.int32 if good.dtype != np.int32 else np.int64
        for bad in (good[:-1], np.concatenate([good, good[:1]]), good.astype(other), good.reshape(1, -1)):
            with pytest.raises(PayloadError):
                decode_grads({**arrays, key: bad}, SHAPE, method, bits)
        with pytest.raises(PayloadError):
            decode_grads({k: v for k, v in arrays.items() if k != key}, SHAPE, method, bits)
        if good.dtype.kind == "f":
            nan = good.copy()
            nan[0] = np.nan
            with pytest.raises(PayloadError, match="NaN"):
                decode_grads({**arrays, key: nan}, SHAPE, method, bits)
    with pytest.raises(PayloadError):
        decode_grads(arrays, (2, 7, 128), method, bits)
    with pytest.raises(PayloadError):
        decode_grads({**arrays, "side.junk": np.zeros(1, np.uint8)}, SHAPE, method, bits)


def test_unknown_method_and_bits():
    with pytest.raises(ValueError):
        encode_grads(torch.randn(SHAPE), "int8", 8)
    with pytest.raises(ValueError):
        encode_grads(torch.randn(SHAPE), "nf", 9)
