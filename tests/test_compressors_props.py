"""Every registered compressor: property tests (hypothesis) for the quantisation error and
the straight-through gradients, exact array sizes, malformed payloads; RD-FSQ's
statistics and clip-range options.

The generic tests run over variants generated from the registry: every codec serving the
image stream, with its default settings and each one-field change the settings declare
(every other choice of a field with a fixed list of choices, every bool flipped). A new
codec module in ``sim/compress/codecs/`` is covered without editing this file."""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from payload_checks import assert_rejects_malformed

from sim.compress import Codec, Payload, PayloadError, codec_names, get_codec, make_codec
from sim.compress.codecs.identity import IdentitySettings
from sim.compress.codecs.rdfsq import RDFSQ, RDFSQSettings, batch_stats
from sim.compress.packing import pack_bits, packed_nbytes, unpack_bits
from sim.settings import codec_settings

DIM = 64  # nf's default block of 64 fits
SHAPE = (2, 6, DIM)
PREFERRED_BITS = 2  # clamped to each codec's bit_range
BITS = {"topk": 4}  # codecs that want another width here (topk keeps round(4/16 * D) values per token)


@dataclass(frozen=True)
class Variant:
    id: str
    name: str
    bits: int
    settings: Any

    def spec(self, seed: int = 0) -> Codec:
        return make_codec(self.name, DIM, self.bits, self.settings, seed)


def codec_bits(name: str) -> int:
    lo, hi = get_codec(name).bit_range
    return min(max(BITS.get(name, PREFERRED_BITS), lo), hi)


def settings_changes(name: str) -> list[tuple[str, Any]]:
    """``(field, value)`` of each one-field change of the default settings: every other
    value of a field with a fixed tuple of choices, every bool flipped."""
    default = get_codec(name).Settings()
    out = []
    for field, setting in codec_settings(name, get_codec(name).Settings):
        value = getattr(default, field)
        if isinstance(setting.choices, tuple):
            out += [(field, c) for c in setting.allowed() if c != value]
        elif isinstance(value, bool):
            out.append((field, not value))
    return out


def variants() -> list[Variant]:
    """The default settings of every image codec plus each one-field change; a variant
    is left out only when the codec's own check refuses it at this width and DIM."""
    out = []
    for name in codec_names("image"):
        cls, bits = get_codec(name), codec_bits(name)
        default = cls.Settings()
        candidates = [(f"{name}-default", default)]
        candidates += [(f"{name}-{field}={value}", dataclasses.replace(default, **{field: value}))
                       for field, value in settings_changes(name)]
        for vid, s in candidates:
            try:
                cls.check(s, bits, DIM)
            except ValueError:
                continue
            out.append(Variant(vid, name, bits, s))
    return out


VARIANTS = variants()
by_variant = pytest.mark.parametrize("v", VARIANTS, ids=[v.id for v in VARIANTS])


def test_generated_variants_cover_every_image_codec():
    assert {v.name for v in VARIANTS} == set(codec_names("image"))
    assert len({v.id for v in VARIANTS}) == len(VARIANTS)
    for name in codec_names("image"):
        cls, mine = get_codec(name), [v for v in VARIANTS if v.name == name]
        lo, hi = cls.bit_range
        assert all(lo <= v.bits <= hi for v in mine)
        assert any(v.settings == cls.Settings() for v in mine), f"{name}: default settings refused at DIM={DIM}"
        for field, setting in codec_settings(name, cls.Settings):  # every declared option is exercised ...
            if isinstance(setting.choices, tuple):
                wanted = set(setting.allowed())
            elif isinstance(setting.default, bool):
                wanted = {False, True}
            else:
                continue
            seen = {getattr(v.settings, field) for v in mine}
            for value in wanted - seen:  # ... unless the codec itself refuses it here
                with pytest.raises(ValueError):
                    cls.check(dataclasses.replace(cls.Settings(), **{field: value}), codec_bits(name), DIM)


def make_spec(spec: Codec, seed=0, x=None):
    """Seeded halves of ``spec`` with any data-dependent state initialised and synced."""
    torch.manual_seed(seed)
    client, server = spec.client(), spec.server()
    if client.needs_init:  # VQ k-means, RD-FSQ EMA statistics: from data, as before round 1
        client.init_from(torch.randn(4, 8, spec.dim, generator=torch.Generator().manual_seed(seed + 1)) if x is None else x)
        server.load_synced(client.state_dict())
    assert not client.needs_init
    return client, server


def make(name, bits=2, seed=0, x=None, **fields):
    """Halves of codec ``name`` with some fields of its settings changed from the defaults."""
    return make_spec(make_codec(name, DIM, bits, get_codec(name).Settings(**fields), seed), seed, x)


def roundtrip(client, server, x):
    with torch.no_grad():
        enc = client(x)
    p = client.pack(enc)
    return enc, p, server.unpack(Payload.from_arrays(p.arrays()), tuple(x.shape))


def bits_of(t):
    return t.detach().contiguous().view(torch.int32)


# ---------------------------------------------------------------- exact sizes
@by_variant
def test_array_sizes_are_exact_and_decode_is_bitwise(v):
    spec = v.spec()
    client, server = make_spec(spec)
    x = torch.randn(SHAPE) * 2
    enc, p, y_hat = roundtrip(client, server, x)
    arrays = p.arrays()
    assert {k: (a.dtype, a.shape) for k, a in arrays.items()} == {
        k: (np.dtype(w.dtype), (w.count,)) for k, w in spec.layout(SHAPE).items()}
    assert server.array_sizes(SHAPE) == {k: a.size for k, a in arrays.items()}
    assert p.nbytes == sum(np.dtype(w.dtype).itemsize * w.count for w in spec.layout(SHAPE).values())
    assert y_hat.shape == SHAPE and y_hat.dtype == enc.y.dtype == torch.float32
    assert torch.equal(bits_of(y_hat), bits_of(enc.y))


@by_variant
def test_index_layout_is_consistent(v):
    spec = v.spec()
    client, server = make_spec(spec)
    enc, p, _ = roundtrip(client, server, torch.randn(SHAPE) * 2)
    layout = spec.index_layout(SHAPE)
    assert layout == client.index_layout(SHAPE) == server.index_layout(SHAPE)
    assert (layout is not None) == get_codec(v.name).integer_codes
    if layout is None:
        assert "index" not in p.codes
        return
    count, bits, symbols = layout  # integer codes: their count, width and alphabet
    assert 2 <= symbols <= 2**bits
    assert p.codes["index"].size == packed_nbytes(count, bits) and enc.codes.numel() == count
    codes = unpack_bits(p.codes["index"], bits, count)
    np.testing.assert_array_equal(codes, enc.codes.reshape(-1).numpy())
    assert codes.min() >= 0 and codes.max() < symbols


# ---------------------------------------------------------------- malformed payloads
@by_variant
def test_malformed_payloads_raise_payload_error(v):
    client, server = make_spec(v.spec())
    assert_rejects_malformed(client, server, torch.randn(SHAPE))


@pytest.mark.parametrize("stats", ["global", "per-dim", "ema"])
@pytest.mark.parametrize("send_range", [False, True])
@pytest.mark.parametrize("span", ["sigma", "minmax"])
def test_rdfsq_every_stats_and_range_combination(stats, send_range, span):
    """The generated variants change one field at a time; RD-FSQ's range arrays depend on
    the fields together (1 value for global, D otherwise), so every combination is checked."""
    spec = RDFSQ(DIM, 2, RDFSQSettings(stats=stats, send_range=send_range, range=span))
    client, server = make_spec(spec)
    x = torch.randn(SHAPE) * 2
    enc, p, y_hat = roundtrip(client, server, x)
    assert server.array_sizes(SHAPE) == {k: a.size for k, a in p.arrays().items()}
    assert torch.equal(bits_of(y_hat), bits_of(enc.y))
    assert_rejects_malformed(client, server, x)


@pytest.mark.parametrize("stats", ["global", "per-dim"])
def test_rdfsq_minmax_range_follows_algorithm_2_as_written(stats):
    """``range=minmax`` against a NumPy transcription of Quantized-TinyLLaVA (arXiv 2511.23402)
    Algorithm 2 with section 3.1's scale(): clip to mu +- 3 sigma, scale by the clipped values'
    own min and max to [-1, 1], round on the even-K grid; the extreme levels are the data's."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32) * rng.uniform(0.5, 2, DIM).astype(np.float32) + 1
    x[0, 0, :4] = 40.0  # outliers: clipped to mu + 3 sigma before the min/max are taken
    spec = RDFSQ(DIM, 2, RDFSQSettings(stats=stats, send_range=False, range="minmax"))
    client, server = spec.client(), spec.server()
    identity_proj(client)
    enc, _, y_hat = roundtrip(client, server, torch.from_numpy(x))
    flat = x.reshape(-1, DIM).astype(np.float64)
    axis = None if stats == "global" else 0
    mu, sigma = flat.mean(axis), flat.std(axis, ddof=1)
    clipped = np.clip(flat, mu - 3 * sigma, mu + 3 * sigma)
    lo, hi = clipped.min(axis), clipped.max(axis)
    e = 2 * (clipped - lo) / (hi - lo) - 1
    k = 4
    z = np.clip(np.round((k - 1) / 2 * e - 0.5) + 0.5, -(k - 1) / 2, (k - 1) / 2)
    want = (z + (k - 1) / 2).astype(np.int64)
    got = enc.codes.numpy().reshape(-1, DIM)
    assert (got != want).mean() < 1e-3  # float32 against float64: only values at a decision boundary may differ
    ends = (got == 0).any(axis) & (got == k - 1).any(axis)
    assert ends.all()  # both end levels are used: in every dimension (per-dim), by the batch (global)
    plain = RDFSQ(DIM, 2, RDFSQSettings(stats=stats, send_range=False))
    p_client = plain.client()
    identity_proj(p_client)
    with torch.no_grad():
        sigma_codes = p_client(torch.from_numpy(x)).codes.numpy().reshape(-1, DIM)
    assert not ((sigma_codes == 0).any(axis) & (sigma_codes == k - 1).any(axis)).all()  # sigma: some end level unused
    assert torch.equal(y_hat, enc.y)


def test_rdfsq_rejects_non_positive_clip_range():
    client, server = make("rdfsq", send_range=True)
    arrays = client.pack(client(torch.randn(SHAPE))).arrays()
    for v in (0.0, -1.0):
        half = arrays["side.half"].copy()
        half[3] = v
        with pytest.raises(PayloadError, match="half-width"):
            server.unpack(Payload.from_arrays({**arrays, "side.half": half}), SHAPE)


def test_vq_out_of_range_index_is_rejected():
    client, server = make("vq", bits=3)
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
    spec = RDFSQ(DIM, bits, RDFSQSettings(stats=stats, alpha=0.0, send_range=send_range))
    client, server = spec.client(), spec.server()
    identity_proj(client)
    client.init_from(x)
    client.eval()
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
    client, server = make("vq", bits=bits, seed=seed % 1000, x=x)
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
    client, server = make_spec(make_codec("identity", DIM, 16, IdentitySettings(dtype=dtype)))
    enc, _, y_hat = roundtrip(client, server, x)
    rel = {"fp16": 2**-11, "bf16": 2**-8, "fp32": 0.0}[dtype]
    assert torch.equal(y_hat, enc.y)
    assert ((y_hat - x).abs() <= rel * x.abs() + 6e-8).all()  # + fp16's smallest subnormal step


# ---------------------------------------------------------------- straight-through gradients
@by_variant
def test_straight_through_gradient_reaches_the_input(v):
    """Every image codec passes a gradient back to its input (the client trains through
    it): non-zero and finite; the recompute with grad gives bitwise the encode's ``y``."""
    client, _ = make_spec(v.spec())
    x = torch.randn(SHAPE) * 2
    with torch.no_grad():
        encoded = client(x)  # the encode (no grad), as the client sends it
    x.requires_grad_(True)
    enc = client(x)  # the recompute before the optimiser step
    assert enc.y.requires_grad and torch.equal(bits_of(enc.y), bits_of(encoded.y))
    up = torch.randn(SHAPE)
    (enc.y * up).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 8), stats=st.sampled_from(["global", "per-dim", "ema"]),
       send_range=st.booleans())
def test_rdfsq_straight_through_gradient(seed, bits, stats, send_range):
    """The rounding passes the upstream gradient unchanged; the clip passes it inside the
    range and stops it outside; the scale divides it by the half-width (when the server
    does not undo the scale)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 5, DIM, generator=g) * 2).requires_grad_(True)
    client = RDFSQ(DIM, bits, RDFSQSettings(stats=stats, alpha=0.0, send_range=send_range)).client()
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
    spec = RDFSQ(DIM, 2, RDFSQSettings(stats="ema", alpha=0.0, ema_decay=0.9))
    client = spec.client()
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
    folded = spec.fold_synced(state, "")
    assert torch.equal(folded["mean"], state["ema_mean"]) and torch.equal(folded["var"], state["ema_var"])
    assert torch.equal(state["mean"], before["mean"])  # the input state is not changed in place
    assert spec.synced_buffers == client.synced_buffers and spec.init_flag == "initted"
    per_dim = RDFSQ(DIM, 2)
    assert per_dim.synced_buffers == () and per_dim.init_flag is None
    assert per_dim.fold_synced({"a": torch.ones(1)}) == {"a": torch.ones(1)}  # other stats: nothing to fold


@pytest.mark.parametrize("stats,size", [("global", 1), ("per-dim", DIM), ("ema", DIM)])
def test_rdfsq_clip_range_is_side_information(stats, size):
    client, server = make("rdfsq", stats=stats, send_range=True)
    x = torch.randn(SHAPE) * 5 + 2
    enc, p, y_hat = roundtrip(client, server, x)
    n = math.prod(SHAPE)
    assert p.code_bytes == packed_nbytes(n, 2) and p.side_bytes == 2 * 2 * size
    assert set(p.side) == {"mu", "half"} and p.side["half"].dtype == np.float16
    plain, _ = make("rdfsq", stats=stats, send_range=False)
    assert plain.pack(plain(x)).nbytes == packed_nbytes(n, 2)  # off (the paper's code): nothing but the codes
