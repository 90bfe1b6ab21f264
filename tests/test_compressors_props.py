"""Every registered compressor: property tests (hypothesis) for the quantisation error and
the straight-through gradients, exact array sizes, malformed payloads; RD-FSQ's
statistics and clip-range options."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.compress import Payload, PayloadError, build_codecs, names
from sim.compress.packing import pack_bits, packed_nbytes, unpack_bits
from sim.compress.rdfsq import RDFSQClient, RDFSQServer, batch_stats
from sim.config import SplitConfig

from payload_checks import assert_rejects_malformed

DIM = 32
SHAPE = (2, 6, DIM)


def variants():
    """(id, config overrides) covering every registered compressor and its options."""
    out = [("identity-fp16", {"compressor": "identity"}), ("identity-bf16", {"compressor": "identity", "identity_dtype": "bf16"})]
    for stats in ("global", "per-dim", "ema"):
        for rng in (False, True):
            out.append((f"rdfsq-{stats}-{'range' if rng else 'norange'}",
                        {"compressor": "rdfsq", "rdfsq_stats": stats, "rdfsq_send_range": rng}))
    out += [("fsq", {"compressor": "fsq"}), ("nf-seed", {"compressor": "nf", "nf_block": 16}),
            ("nf-qlora-dq", {"compressor": "nf", "nf_block": 16, "nf_codebook": "qlora", "nf_double_quant": True}),
            ("topk", {"compressor": "topk", "bits": 4}), ("vq", {"compressor": "vq", "bits": 5})]
    return out


VARIANTS = variants()


def test_every_registered_compressor_is_covered():
    assert {kw["compressor"] for _, kw in VARIANTS} == set(names())


def make(kw, bits=2, seed=0, x=None):
    torch.manual_seed(seed)
    cfg = SplitConfig(hidden_size=DIM, **{"bits": bits, **kw})
    client, server = build_codecs(cfg, DIM)
    if client.needs_init:  # VQ k-means, RD-FSQ EMA statistics: from data, as before round 1
        client.init_from(torch.randn(4, 8, DIM, generator=torch.Generator().manual_seed(seed + 1)) if x is None else x)
        server.load_synced(client.state_dict())
    return client, server


def roundtrip(client, server, x):
    with torch.no_grad():
        enc = client(x)
    p = client.pack(enc)
    return enc, p, server.unpack(Payload.from_arrays(p.arrays()), tuple(x.shape))


# ---------------------------------------------------------------- exact sizes
@pytest.mark.parametrize("vid,kw", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_array_sizes_are_exact_and_decode_is_bitwise(vid, kw):
    client, server = make(kw)
    x = torch.randn(SHAPE) * 2
    enc, p, y_hat = roundtrip(client, server, x)
    assert server.array_sizes(SHAPE) == {k: a.size for k, a in p.arrays().items()}
    assert torch.equal(y_hat, enc.y)
    layout = client.index_layout(SHAPE)
    assert layout == server.index_layout(SHAPE)
    if layout is not None:  # integer codes: their count, width and alphabet
        count, bits, symbols = layout
        assert p.codes["index"].size == packed_nbytes(count, bits) and symbols <= 2**bits


# ---------------------------------------------------------------- malformed payloads
@pytest.mark.parametrize("vid,kw", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_malformed_payloads_raise_payload_error(vid, kw):
    client, server = make(kw)
    assert_rejects_malformed(client, server, torch.randn(SHAPE))


def test_rdfsq_rejects_non_positive_clip_range():
    client, server = make({"compressor": "rdfsq", "rdfsq_send_range": True})
    arrays = client.pack(client(torch.randn(SHAPE))).arrays()
    for v in (0.0, -1.0):
        half = arrays["side.half"].copy()
        half[3] = v
        with pytest.raises(PayloadError, match="half-width"):
            server.unpack(Payload.from_arrays({**arrays, "side.half": half}), SHAPE)


def test_vq_out_of_range_index_is_rejected():
    client, server = make({"compressor": "vq", "bits": 3})
    arrays = client.pack(client(torch.randn(SHAPE))).arrays()
    assert server.size == 8  # every 3-bit value is a code here; a smaller codebook is in test_vq
    bad = {**arrays, "codes.index": pack_bits(np.full(12, 7), 3)[:-1]}
    with pytest.raises(PayloadError):
        server.unpack(Payload.from_arrays(bad), SHAPE)


# ---------------------------------------------------------------- pack / unpack
@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 16), shape=st.lists(st.integers(0, 7), min_size=1, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_is_exact_for_every_width_and_shape(bits, shape, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=shape)
    packed = pack_bits(codes, bits)
    assert packed.size == packed_nbytes(codes.size, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, codes.size).reshape(codes.shape), codes)


# ---------------------------------------------------------------- error within a step
def identity_proj(client):
    with torch.no_grad():
        client.proj.weight.copy_(torch.eye(DIM))
        client.proj.bias.zero_()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 8), stats=st.sampled_from(["global", "per-dim", "ema"]),
       send_range=st.booleans(), scale=st.floats(1e-2, 1e2), b=st.integers(1, 3), n=st.integers(2, 9))
def test_rdfsq_error_is_within_half_a_step(seed, bits, stats, send_range, scale, b, n):
    x = torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed)) * scale
    client = RDFSQClient(DIM, bits, stats, 0.0, send_range)
    identity_proj(client)
    client.init_from(x)
    client.eval()
    server = RDFSQServer(DIM, bits, stats, send_range)
    enc, _, y_hat = roundtrip(client, server, x)
    assert torch.equal(y_hat, enc.y)
    if stats == "ema":
        mu, half = client.mean, 3 * client.var.sqrt()
    else:
        mu, sigma = batch_stats(x, stats)
        half = 3 * sigma
    half = half.clamp_min(1e-6)
    step = 2 / (2**bits - 1)  # grid spacing on [-1, 1]
    if send_range:  # in the features' units, with the fp16 range (half rounded up: <= 1 fp16 ulp wider)
        half16 = half * (1 + 2**-10)
        clipped = torch.minimum(torch.maximum(x, mu - half16), mu + half16)
        err = (enc.y - clipped).abs()
        assert (err <= half16 * step / 2 + 1e-3 * (half + mu.abs()) + 1e-6).all()
    else:
        e = (torch.minimum(torch.maximum(x, mu - half), mu + half) - mu) / half
        assert ((enc.y - e).abs() <= step / 2 + 1e-5).all()
    assert len(torch.unique(enc.codes)) <= 2**bits


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 10), n=st.integers(1, 20))
def test_vq_decodes_to_the_nearest_codeword(seed, bits, n):
    x = torch.randn(2, n, DIM, generator=torch.Generator().manual_seed(seed))
    client, server = make({"compressor": "vq", "bits": bits}, bits=bits, seed=seed % 1000, x=x)
    enc, p, y_hat = roundtrip(client, server, x)
    assert torch.equal(y_hat, enc.y) and p.nbytes == packed_nbytes(2 * n, bits)
    flat = x.reshape(-1, DIM)
    d = ((flat[:, None] - client.codebook[None]) ** 2).sum(-1).sqrt()  # exact, unlike cdist's matmul form
    got = (y_hat.reshape(-1, DIM) - flat).norm(dim=-1)
    assert (got <= d.min(1).values + 1e-4).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(["fp16", "bf16", "fp32"]), scale=st.floats(1e-3, 1e3))
def test_identity_error_is_within_the_dtype_rounding(seed, dtype, scale):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale
    client, server = make({"compressor": "identity", "identity_dtype": dtype})
    enc, _, y_hat = roundtrip(client, server, x)
    rel = {"fp16": 2**-11, "bf16": 2**-8, "fp32": 0.0}[dtype]
    assert torch.equal(y_hat, enc.y)
    assert ((y_hat - x).abs() <= rel * x.abs() + 6e-8).all()  # + fp16's smallest subnormal step


# ---------------------------------------------------------------- straight-through gradients
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 8), stats=st.sampled_from(["global", "per-dim", "ema"]),
       send_range=st.booleans())
def test_rdfsq_straight_through_gradient(seed, bits, stats, send_range):
    """The rounding passes the upstream gradient unchanged; the clip passes it inside the
    range and stops it outside; the scale divides it by the half-width (when the server
    does not undo the scale)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 5, DIM, generator=g) * 2).requires_grad_(True)
    client = RDFSQClient(DIM, bits, stats, 0.0, send_range)
    identity_proj(client)
    client.init_from(x.detach())
    up = torch.randn(2, 5, DIM, generator=g)
    client.eval()  # EMA statistics stay put, so the range below is the one used
    (client(x).y * up).sum().backward()
    if stats == "ema":
        mu, half = client.mean, (3 * client.var.sqrt()).clamp_min(1e-6)
    else:
        mu, sigma = batch_stats(x.detach(), stats)
        half = (3 * sigma).clamp_min(1e-6)
    if send_range:  # the client clips with the fp16 range it sends
        mu = mu.half().float()
        half = client(x.detach()).side["half"].float().reshape(half.shape)
    inside = (x.detach() > mu - half) & (x.detach() < mu + half)
    want = up * inside / (1.0 if send_range else half)
    assert x.grad.abs().sum() > 0
    assert torch.allclose(x.grad, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- RD-FSQ statistics
def test_rdfsq_ema_statistics_change_once_per_round():
    x = torch.randn(SHAPE) * 3 + 1
    client = RDFSQClient(DIM, 2, "ema", 0.0, decay=0.9)
    assert client.needs_init and client.synced_buffers == ("mean", "var", "ema_mean", "ema_var", "initted")
    with pytest.raises(RuntimeError, match="not initialised"):
        client(x)
    client.init_from(x)
    assert not client.needs_init
    mu, sigma = batch_stats(client.proj(x).detach(), "per-dim")
    assert torch.allclose(client.mean, mu) and torch.allclose(client.var, sigma**2)
    before = {k: v.clone() for k, v in client.state_dict().items()}
    with torch.no_grad():
        first = client(x * 2)  # the encode: no state change
    assert all(torch.equal(v, before[k]) for k, v in client.state_dict().items())
    again = client((x * 2).requires_grad_(True))  # the recompute: only the EMA buffers move
    assert torch.equal(again.codes, first.codes) and torch.equal(again.y.detach(), first.y)
    state = client.state_dict()
    assert torch.equal(state["mean"], before["mean"]) and torch.equal(state["var"], before["var"])
    m2, s2 = batch_stats(client.proj(x * 2).detach(), "per-dim")
    assert torch.allclose(state["ema_mean"], 0.9 * before["ema_mean"] + 0.1 * m2, atol=1e-6)
    assert torch.allclose(state["ema_var"], 0.9 * before["ema_var"] + 0.1 * s2**2, atol=1e-5)
    folded = RDFSQClient.fold_synced(state, "")
    assert torch.equal(folded["mean"], state["ema_mean"]) and torch.equal(folded["var"], state["ema_var"])
    assert RDFSQClient.fold_synced({"a": torch.ones(1)}) == {"a": torch.ones(1)}  # other stats: nothing to fold


@pytest.mark.parametrize("stats,size", [("global", 1), ("per-dim", DIM), ("ema", DIM)])
def test_rdfsq_clip_range_is_side_information(stats, size):
    client, server = make({"compressor": "rdfsq", "rdfsq_stats": stats, "rdfsq_send_range": True})
    x = torch.randn(SHAPE) * 5 + 2
    enc, p, y_hat = roundtrip(client, server, x)
    n = math.prod(SHAPE)
    assert p.code_bytes == packed_nbytes(n, 2) and p.side_bytes == 2 * 2 * size
    assert set(p.side) == {"mu", "half"} and p.side["half"].dtype == np.float16
    plain, _ = make({"compressor": "rdfsq", "rdfsq_stats": stats})
    assert plain.pack(plain(x)).nbytes == packed_nbytes(n, 2)  # default: nothing but the codes
