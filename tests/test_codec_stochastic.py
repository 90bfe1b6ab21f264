"""The ``stochastic`` gradient codec (sim/compress/codecs/stochastic.py): an independent
NumPy reference of the rounding, exact sizes, the error bound, unbiasedness tested
statistically with fixed seeds, determinism, malformed payloads and a run with it."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.compress import PayloadError, codec_names, make_codec
from sim.compress.base import content_seed
from sim.compress.codecs.stochastic import StochasticSettings
from sim.config import ConfigError
from sim.training.reference import run_reference

from conftest import scratch_cfg
from payload_checks import assert_rejects_malformed_gradient

SHAPE = (2, 6, 128)  # 2 samples of 6 tokens x 128 channels


def codec(bits, scale="token", seed=0):
    return make_codec("stochastic", 0, bits, StochasticSettings(scale=scale), seed=seed)


def groups_np(g: np.ndarray, scale: str) -> np.ndarray:
    """The groups written from the docstring: rows (token), or each sample's columns (channel)."""
    if scale == "token":
        return g.reshape(-1, g.shape[-1])
    if g.ndim == 3:
        return np.concatenate([m.T for m in g])  # sample by sample, channel by channel
    return g.T


def numpy_reference(g: np.ndarray, bits: int, scale: str, u: np.ndarray):
    """Indices and reconstruction from the formula (float32, the same uniform draws ``u``)."""
    x = groups_np(g, scale).astype(np.float32)
    k = 2**bits - 1
    lo = x.min(1).astype(np.float16)
    lo = np.where(lo.astype(np.float32) > x.min(1), np.nextafter(lo, np.float16(-np.inf)), lo)
    span = (x.max(1) - lo.astype(np.float32)).astype(np.float16)
    span = np.where(span.astype(np.float32) < x.max(1) - lo.astype(np.float32), np.nextafter(span, np.float16(np.inf)), span)
    step = np.maximum(span.astype(np.float32) / np.float32(k), np.float32(1e-30))[:, None]
    t = np.clip((x - lo.astype(np.float32)[:, None]) / step, 0, k)
    low = np.floor(t)
    idx = np.clip(low + (u < t - low), 0, k).astype(np.int64)
    return idx, lo, span, lo.astype(np.float32)[:, None] + idx * (span.astype(np.float32) / np.float32(k))[:, None]


def test_is_registered_for_the_gradient_only_and_configurable():
    assert "stochastic" in codec_names("gradient") and "stochastic" not in codec_names("image")
    cfg = scratch_cfg(grad_compressor="stochastic", grad_bits=3, stochastic_scale="channel", grad_entropy_coding="ans")
    c = cfg.grad_codec()
    assert c.name == "stochastic" and c.bits == 3 and c.settings.scale == "channel" and c.unbiased
    with pytest.raises(ConfigError, match="grad-bits"):
        scratch_cfg(grad_compressor="stochastic", grad_bits=9)
    with pytest.raises(ConfigError, match="stochastic-scale"):
        scratch_cfg(grad_compressor="stochastic", stochastic_scale="block")
    with pytest.raises(ConfigError, match="grad-entropy-coding"):
        scratch_cfg(grad_compressor="topk", grad_entropy_coding="ans")  # topk has no integer codes


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 8), scale=st.sampled_from(["token", "channel"]),
       mag=st.floats(1e-4, 1e2), shape=st.sampled_from([SHAPE, (3, 5, 16), (7, 20), (1, 1, 9)]))
def test_matches_the_numpy_reference(seed, bits, scale, mag, shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * mag
    c = codec(bits, scale, seed=seed)
    arrays = c.encode_gradient(g)
    gx = groups_np(g.numpy(), scale)
    u = torch.rand(gx.shape, generator=torch.Generator().manual_seed(content_seed(seed, g))).numpy()
    idx, lo, span, recon = numpy_reference(g.numpy(), bits, scale, u)
    np.testing.assert_array_equal(arrays["side.lo"], lo)
    np.testing.assert_array_equal(arrays["side.span"], span)
    from sim.compress.packing import unpack_bits
    np.testing.assert_array_equal(unpack_bits(arrays["codes.index"], bits, g.numel()), idx.reshape(-1))
    out = c.decode_gradient(arrays, shape)
    np.testing.assert_allclose(groups_np(out.numpy(), scale), recon, rtol=1e-6, atol=1e-6 * mag)


@pytest.mark.parametrize("scale", ["token", "channel"])
@pytest.mark.parametrize("bits", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [SHAPE, (13, 128)])
def test_payload_is_the_packed_codes_plus_four_bytes_per_group(bits, scale, shape):
    c = codec(bits, scale)
    arrays = c.encode_gradient(torch.randn(shape))
    n, dim = math.prod(shape), shape[-1]
    groups = n // dim if scale == "token" else (shape[0] * dim if len(shape) == 3 else dim)
    assert sum(a.nbytes for a in arrays.values()) == math.ceil(n * bits / 8) + 4 * groups
    assert {k: a.size for k, a in arrays.items()} == {k: w.count for k, w in c.gradient_layout(shape).items()}


@pytest.mark.parametrize("scale", ["token", "channel"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_every_value_lands_on_a_neighbouring_grid_point(bits, scale):
    g = torch.randn(SHAPE) * 1e-3
    c = codec(bits, scale)
    arrays = c.encode_gradient(g)
    out = c.decode_gradient(arrays, SHAPE)
    step = torch.from_numpy(arrays["side.span"].astype(np.float32)) / (2**bits - 1)
    err = groups_np((out - g).numpy(), scale)
    assert (np.abs(err) <= step.numpy()[:, None] * (1 + 1e-5) + 1e-12).all()  # floor or ceil of t, never further


@pytest.mark.parametrize("scale", ["token", "channel"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_rounding_is_unbiased(bits, scale):
    """The mean of K independent quantisations (K codec seeds) of one gradient converges to
    it: each value's error has mean 0 and variance frac·(1 - frac)·step^2 <= step^2 / 4, so
    the mean's squared error summed over all values has expectation
    sum(frac·(1 - frac)·step^2) / K. The statistic must be within 20 % of that (it is a sum
    of 1,536 independent terms; a bias of 1 % of a step at K = 400 would double it), and no
    value's mean may be more than 5 of its standard deviations (step / (2 sqrt K)) off."""
    K = 400
    g = torch.randn(SHAPE) * 1e-3
    outs = torch.stack([codec(bits, scale, seed=k).decode_gradient(codec(bits, scale, seed=k).encode_gradient(g), SHAPE)
                        for k in range(K)])
    arrays = codec(bits, scale).encode_gradient(g)  # the grid (lo, span) does not depend on the seed
    lo = torch.from_numpy(arrays["side.lo"].astype(np.float32))[:, None]
    step = torch.from_numpy(arrays["side.span"].astype(np.float32))[:, None] / (2**bits - 1)
    x = torch.from_numpy(groups_np(g.numpy(), scale))
    t = (x - lo) / step
    frac = t - torch.floor(t)
    expected = float((frac * (1 - frac) * step**2).sum()) / K
    mean = torch.from_numpy(groups_np(outs.mean(0).numpy(), scale))
    stat = float(((mean - x) ** 2).sum())
    assert 0.8 < stat / expected < 1.2, (stat, expected)
    assert float(((mean - x).abs() / (step / (2 * math.sqrt(K)))).max()) < 5.0
    # the test can fail: deterministic rounding to the nearest grid point is biased, and
    # its mean (itself) is far outside the bound
    nearest = lo + torch.round(t) * step
    assert float(((nearest - x) ** 2).sum()) / expected > 10


def test_deterministic_given_seed_and_input():
    g = torch.randn(SHAPE)
    a, b = codec(4, seed=3).encode_gradient(g), codec(4, seed=3).encode_gradient(g)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other_seed = codec(4, seed=4).encode_gradient(g)
    assert not np.array_equal(a["codes.index"], other_seed["codes.index"])
    other_input = codec(4, seed=3).encode_gradient(g * (1 + 2**-20))  # a different gradient draws afresh
    assert not np.array_equal(a["codes.index"], other_input["codes.index"])


def test_channel_groups_are_each_samples_columns():
    g = torch.randn(SHAPE)
    g[:, :, 0] *= 1000.0  # one loud channel: per token it stretches every row's grid
    tok, ch = codec(4, "token"), codec(4, "channel")
    e_tok = (tok.decode_gradient(tok.encode_gradient(g), SHAPE) - g)[:, :, 1:].abs().mean()
    e_ch = (ch.decode_gradient(ch.encode_gradient(g), SHAPE) - g)[:, :, 1:].abs().mean()
    assert e_ch < e_tok / 50
    lo = ch.encode_gradient(g)["side.lo"].reshape(2, 128).astype(np.float32)
    assert (lo <= g.amin(1).numpy()).all() and (lo > g.amin(1).numpy() - 1e-2 * np.abs(g.amin(1).numpy()) - 1e-6).all()


def test_constant_and_zero_gradients_are_exact():
    for v in (0.0, 0.25, -3.0):  # fp16-representable: lo = v, span = 0
        g = torch.full(SHAPE, v)
        c = codec(2)
        assert torch.equal(c.decode_gradient(c.encode_gradient(g), SHAPE), g)


def test_refuses_to_encode_nan():
    g = torch.randn(SHAPE)
    g[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        codec(4).encode_gradient(g)


@pytest.mark.parametrize("scale", ["token", "channel"])
def test_malformed_payloads_raise_payload_error(scale):
    c = codec(3, scale)
    g = torch.randn(SHAPE) * 1e-3
    assert_rejects_malformed_gradient(c, g)
    arrays = c.encode_gradient(g)
    bad = arrays["side.span"].copy()
    bad[1] = -1.0
    with pytest.raises(PayloadError, match="negative"):
        c.decode_gradient({**arrays, "side.span": bad}, SHAPE)
    huge = arrays["side.lo"].copy()
    huge[:] = np.float16(65504)
    span = np.full_like(arrays["side.span"], np.float16(65504))
    out = c.decode_gradient({**arrays, "side.lo": huge, "side.span": span}, SHAPE)  # large but finite: decodes
    assert torch.isfinite(out).all()


def test_a_run_with_the_stochastic_gradient_codec(tmp_path):
    cfg = scratch_cfg(grad_compressor="stochastic", grad_bits=4, grad_entropy_coding="ans", grad_error_feedback=True,
                      num_server_rounds=1, local_steps=4, steps_per_exchange=2, batch_size=4, num_samples=120,
                      hidden_size=32, image_size=16, patch_size=4, out_dir=str(tmp_path))
    res = run_reference(cfg, 2)
    assert len(res.step_losses) == 4 and all(math.isfinite(v) for v in res.step_losses)
    again = run_reference(cfg, 2)
    assert again.step_losses == res.step_losses  # deterministic given the seed
    down = [r for r in res.ledger.rows if r.direction == "down" and r.kind == "train.split_step"]
    fp32 = run_reference(cfg.replace(grad_compressor="none", grad_entropy_coding="none", grad_error_feedback=False), 2)
    fp32_down = [r for r in fp32.ledger.rows if r.direction == "down" and r.kind == "train.split_step"]
    grads = lambda rows: sum(r.payload_bytes for r in rows)
    weights = sum(r.payload_bytes for r in down if r.exchange == 0)
    assert grads(down) - weights < (grads(fp32_down) - weights) / 6  # 4-bit codes + side info vs fp32
