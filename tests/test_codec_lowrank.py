"""The ``lowrank`` gradient codec (sim/compress/codecs/lowrank.py): exact sizes, exactness
on low-rank gradients, the projection bound and the SVD's optimum, balanced fp16 factors,
determinism, malformed payloads and a run with it (and with error feedback)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.compress import PayloadError, codec_names, make_codec
from sim.compress.codecs.lowrank import LowRankSettings
from sim.config import ConfigError
from sim.training.reference import run_reference

from conftest import scratch_cfg
from payload_checks import assert_rejects_malformed_gradient

SHAPE = (3, 64, 128)  # 3 samples of N = 64 tokens x D = 128


def codec(rank=4, iters=1, dtype="fp16", seed=0):
    return make_codec("lowrank", 0, 16, LowRankSettings(rank=rank, iters=iters, dtype=dtype), seed=seed)


def roundtrip(c, g):
    return c.decode_gradient(c.encode_gradient(g), tuple(g.shape))


def low_rank(shape, r, seed=0, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    s, n, d = shape
    return (torch.randn(s, n, r, generator=gen) @ torch.randn(s, r, d, generator=gen)) * scale


def test_is_registered_for_the_gradient_only_and_configurable():
    assert "lowrank" in codec_names("gradient") and "lowrank" not in codec_names("image")
    c = scratch_cfg(grad_compressor="lowrank", lowrank_rank=2, lowrank_iters=3, lowrank_dtype="fp32").grad_codec()
    assert (c.settings.rank, c.settings.iters, c.settings.dtype) == (2, 3, "fp32")
    with pytest.raises(ConfigError, match="lowrank-rank"):
        scratch_cfg(grad_compressor="lowrank", lowrank_rank=0)
    with pytest.raises(ConfigError, match="grad-entropy-coding"):
        scratch_cfg(grad_compressor="lowrank", grad_entropy_coding="ans")  # no integer codes


@pytest.mark.parametrize("dtype,item", [("fp16", 2), ("fp32", 4)])
@pytest.mark.parametrize("rank", [1, 4, 64, 500])
@pytest.mark.parametrize("shape", [SHAPE, (2, 5, 7), (40, 16)])
def test_bytes_are_n_plus_d_times_r_values_per_matrix(rank, dtype, item, shape):
    c = codec(rank, dtype=dtype)
    arrays = c.encode_gradient(torch.randn(shape))
    mats, n = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
    r = min(rank, n, shape[-1])
    assert sum(a.nbytes for a in arrays.values()) == mats * (n + shape[-1]) * r * item
    assert {k: (a.dtype.name, a.size) for k, a in arrays.items()} == {
        k: (w.dtype, w.count) for k, w in c.gradient_layout(shape).items()}


@pytest.mark.parametrize("r", [1, 2, 4])
def test_a_gradient_of_rank_r_is_exact_up_to_the_wire_dtype(r):
    g = low_rank(SHAPE, r)
    for dtype, tol in (("fp16", 2e-3), ("fp32", 1e-5)):
        out = roundtrip(codec(r, dtype=dtype), g)
        assert float((out - g).norm() / g.norm()) < tol, dtype


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 12), iters=st.integers(1, 4),
       shape=st.sampled_from([SHAPE, (2, 9, 33), (1, 64, 8), (30, 20)]), mag=st.floats(1e-6, 1e2))
def test_never_worse_than_zeros_and_never_better_than_the_svd(seed, rank, iters, shape, mag):
    """``P P^T M`` is a projection: its error is at most ``||M||`` and at least the best
    rank-r error (Eckart-Young: the energy of the singular values beyond r)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * mag
    out = roundtrip(codec(rank, iters, dtype="fp32", seed=seed), g)
    m = g.reshape(-1, *shape[-2:]).double()
    sv = torch.linalg.svdvals(m)
    r = min(rank, shape[-2], shape[-1])
    best = float(sv[:, r:].pow(2).sum().sqrt())
    err = float((out.double() - g.double()).norm())
    assert err <= float(g.double().norm()) * (1 + 1e-5)
    assert err >= best * (1 - 1e-4)


def test_more_power_iterations_approach_the_best_rank_r_error():
    gen = torch.Generator().manual_seed(1)
    u, v = torch.linalg.qr(torch.randn(64, 64, generator=gen))[0], torch.linalg.qr(torch.randn(128, 64, generator=gen))[0]
    m = (u * (0.7 ** torch.arange(64.0))) @ v.T  # a decaying spectrum, like real gradients
    g = m.expand(2, 64, 128).contiguous() * 1e-3
    sv = torch.linalg.svdvals(g[0].double())
    best = float(sv[4:].pow(2).sum().sqrt()) * math.sqrt(2)
    errs = [float((roundtrip(codec(4, iters, "fp32"), g) - g).double().norm()) for iters in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2] and errs[0] > best * 1.5 and errs[2] < best * 1.01


def test_fp16_factors_are_balanced_so_small_gradients_survive():
    g = low_rank(SHAPE, 2, scale=1e-7)  # entries ~1e-7: fp16 alone would lose them (its normal range ends at 6e-5)
    arrays = codec(2).encode_gradient(g)
    p, q = (np.abs(arrays[k].astype(np.float32)) for k in ("codes.p", "codes.q"))
    assert p.max() > 6.1e-5 and q.max() > 6.1e-5  # both factors in fp16's normal range
    out = codec(2).decode_gradient(arrays, SHAPE)
    assert float((out - g).norm() / g.norm()) < 5e-3


def test_deterministic_given_seed_and_input():
    g = torch.randn(SHAPE)
    a, b = codec(seed=5).encode_gradient(g), codec(seed=5).encode_gradient(g)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["codes.p"], codec(seed=6).encode_gradient(g)["codes.p"])


def test_each_sample_is_factorised_on_its_own():
    g = low_rank(SHAPE, 1)
    g[1] = low_rank((1, 64, 128), 1, seed=9)[0]  # each sample rank 1, but different
    out = roundtrip(codec(1, dtype="fp32"), g)
    assert float((out - g).norm() / g.norm()) < 1e-5


def test_zero_gradient_and_nan_input():
    z = torch.zeros(SHAPE)
    assert torch.equal(roundtrip(codec(), z), z)
    g = torch.randn(SHAPE)
    g[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        codec().encode_gradient(g)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_malformed_payloads_raise_payload_error(dtype):
    c = codec(3, dtype=dtype)
    g = torch.randn(SHAPE) * 1e-3
    assert_rejects_malformed_gradient(c, g)
    arrays = c.encode_gradient(g)
    if dtype == "fp32":  # finite factors whose product overflows float32
        huge = {k: np.full_like(a, 3e38) for k, a in arrays.items()}
        with pytest.raises(PayloadError, match="overflows"):
            c.decode_gradient(huge, SHAPE)


@pytest.mark.parametrize("feedback", [False, True])
def test_a_run_with_the_lowrank_gradient_codec(tmp_path, feedback):
    cfg = scratch_cfg(grad_compressor="lowrank", lowrank_rank=2, grad_error_feedback=feedback, num_server_rounds=1,
                      local_steps=4, steps_per_exchange=2, batch_size=4, num_samples=120, hidden_size=32,
                      image_size=16, patch_size=4, out_dir=str(tmp_path))
    res = run_reference(cfg, 2)
    assert len(res.step_losses) == 4 and all(math.isfinite(v) for v in res.step_losses)
    assert run_reference(cfg, 2).step_losses == res.step_losses  # deterministic given the seed
