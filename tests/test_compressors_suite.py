"""FSQ, blockwise NormalFloat and randomized top-k: wire round trips, exact sizes,
error bounds, STE gradients, malformed payloads, and agreement with references."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from payload_checks import assert_rejects_malformed

from sim.compress.base import Payload, PayloadError
from sim.compress.codecs.fsq import FSQ
from sim.compress.codecs.nf import NF, BlockNF, NFSettings, nf_codebook, qlora_codebook, qlora_offset, seed_codebook
from sim.compress.codecs.topk import TopK, TopKSettings
from sim.compress.packing import pack_bits, unpack_bits

DIM = 128
SHAPE = (2, 6, DIM)
T = SHAPE[0] * SHAPE[1]

# bitsandbytes NF4 (QLoRA paper, Appendix E / bitsandbytes functional.py)
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524242401123, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def spec_of(name, bits, dim=DIM, seed=0, **kw):
    """The codec definition; ``kw`` are fields of its settings dataclass."""
    if name == "fsq":
        return FSQ(dim, bits, seed=seed)
    if name == "nf":
        return NF(dim, bits, NFSettings(**kw), seed)
    return TopK(dim, bits, TopKSettings(**kw), seed)


def make(name, bits, **kw):
    torch.manual_seed(0)
    spec = spec_of(name, bits, **kw)
    return spec.client(), spec.server()


def identity_proj(client):
    """FSQ without its learned projection (``tanh`` of the input itself)."""
    with torch.no_grad():
        client.proj.weight.copy_(torch.eye(client.dim))
        client.proj.bias.zero_()
    return client


def layout_nbytes(layout):
    return sum(np.dtype(a.dtype).itemsize * a.count for a in layout.values())


def variants():
    out = [("fsq", b, {}) for b in (1, 2, 3, 4, 8)]
    out += [("nf", b, {"codebook": cb, "double_quant": dq}) for b in (1, 2, 3, 4, 8) for cb in ("seed", "qlora") for dq in (False, True)]
    out += [("topk", b, {}) for b in (1, 2, 3, 4, 8)] + [("topk", 1, {"random": 0.0})]
    return out


def vid(v):
    name, bits, kw = v
    return f"{name}-b{bits}-" + "-".join(f"{k}={w}" for k, w in kw.items())


VARIANTS = variants()


def roundtrip(client, server, x):
    enc = client(x)
    p = client.pack(enc)
    return enc, p, server.unpack(Payload.from_arrays(p.arrays()), tuple(x.shape))


def bits_of(t):
    return t.detach().contiguous().view(torch.int32)


# ---------------------------------------------------------------- shared contract
@pytest.mark.parametrize("name,bits,kw", VARIANTS, ids=map(vid, VARIANTS))
def test_server_reconstruction_is_bitwise_client_y(name, bits, kw):
    client, server = make(name, bits, **kw)
    x = torch.randn(SHAPE) * 3
    x[0, 0, :64] = 0.0  # an all-zero block/token
    x[0, 1, 64:] = -2.5  # a constant block
    enc, _, y_hat = roundtrip(client, server, x)
    assert torch.equal(bits_of(y_hat), bits_of(enc.y))


def expected_nbytes(name, bits, kw, rows=T, dim=DIM):
    codes = math.ceil(rows * dim * bits / 8)
    if name == "fsq":
        return codes
    if name == "nf":
        nb = rows * dim // 64
        if kw["codebook"] == "seed":  # fp16 minimums + fp16 ranges | uint8 ranges + fp32 per token
            return codes + 2 * nb + (nb + 4 * rows if kw["double_quant"] else 2 * nb)
        return codes + (nb + 4 * rows if kw["double_quant"] else 2 * nb)  # fp16 | uint8 + fp32 absmax
    k = round(bits / 16 * dim)
    m = k + round(kw.get("random", 0.1) * dim)
    mask, index = math.ceil(rows * dim / 8), math.ceil(rows * m * math.ceil(math.log2(dim)) / 8)
    return 2 * rows * m + min(mask, index) + 1


@pytest.mark.parametrize("name,bits,kw", VARIANTS, ids=map(vid, VARIANTS))
def test_payload_size_formula_is_exact(name, bits, kw):
    client, _ = make(name, bits, **kw)
    p = client.pack(client(torch.randn(SHAPE)))
    assert p.nbytes == expected_nbytes(name, bits, kw)
    assert layout_nbytes(client.spec.layout(SHAPE)) == p.nbytes  # the declared wire layout agrees
    if name != "topk":
        assert p.code_bytes == math.ceil(T * DIM * bits / 8) and p.ideal_bits == T * DIM * bits


def test_topk_picks_the_cheaper_position_format():
    dense = spec_of("topk", 4).client()  # m = 32 + 13 = 45 >= 128/7: bitmask
    p = dense.pack(dense(torch.randn(SHAPE)))
    assert p.side["format"][0] == 0 and p.side["positions"].nbytes == T * DIM // 8
    sparse = spec_of("topk", 1, random=0.0).client()  # m = 8: 8 * 7 bits < 128 bits
    p = sparse.pack(sparse(torch.randn(SHAPE)))
    assert p.side["format"][0] == 1 and p.side["positions"].nbytes == math.ceil(T * 8 * 7 / 8)


def test_topk_ratios():
    client = spec_of("topk", 4).client()
    p = client.pack(client(torch.randn(SHAPE)))
    assert client.nominal_ratio() == DIM / 32
    assert client.true_ratio(p) == pytest.approx(2 * T * DIM / p.nbytes)
    assert client.true_ratio(p) < client.nominal_ratio()  # extras and positions cost


# ---------------------------------------------------------------- error bounds
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_fsq_within_half_a_step_of_tanh(bits):
    client, _ = make("fsq", bits)
    identity_proj(client)
    x = torch.randn(SHAPE) * 2
    y = client(x).y.detach()
    assert (y - torch.tanh(x)).abs().max() <= 1 / (2**bits - 1) + 1e-6
    assert len(torch.unique(y)) <= 2**bits


def covering_radius(cb):
    """Largest distance from a point of [-1, 1] to its nearest codebook entry."""
    gaps = (cb[1:] - cb[:-1]) / 2
    return max(float(gaps.max()) if len(gaps) else 0.0, 1 - float(cb.max()), float(cb.min()) + 1)


def transmitted_scales(p, dq):
    if dq:
        q = p.side["scale_q"].astype(np.float32).reshape(T, -1)
        return torch.from_numpy(q * (p.side["token_scale"] / np.float32(255.0))[:, None])
    return torch.from_numpy(p.side["scale"].astype(np.float32).reshape(T, -1))


def scale_upper_bound(blocks, codebook, dq):
    """Largest transmitted block scale the codec may use: the true scale (the seed range
    also covers the fp16 minimum, rounded down by <= 1 ulp) plus one uint8 step / fp16 ulp."""
    true = blocks.abs().amax(-1) if codebook == "qlora" else blocks.amax(-1) - blocks.amin(-1)
    if codebook == "seed":
        true = true + blocks.amin(-1).abs() * 2**-10
    step = true.amax(1, keepdim=True) / 255 if dq else true * 2**-10
    return true + step + 1e-6


def nf_error_bound(blocks, codebook, bits, dq):
    """half the largest codebook gap (or the distance to +-1) times the block scale"""
    s_up = scale_upper_bound(blocks, codebook, dq)
    width = s_up if codebook == "qlora" else s_up / 2  # [-1, 1] spans 2 units of e for min/max
    return covering_radius(nf_codebook(codebook, bits)) * width + 1e-5 * blocks.abs().amax(-1) + 1e-6


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("codebook", ["seed", "qlora"])
@pytest.mark.parametrize("dq", [False, True])
def test_nf_error_within_half_the_largest_gap_times_block_scale(bits, codebook, dq):
    client, _ = make("nf", bits, codebook=codebook, double_quant=dq)
    x = torch.randn(SHAPE) * torch.logspace(-2, 2, DIM) + 0.5  # blocks of very different scales
    p = client.pack(enc := client(x))
    blocks = x.reshape(T, -1, 64)
    s_hat = transmitted_scales(p, dq)
    true = blocks.abs().amax(-1) if codebook == "qlora" else blocks.amax(-1) - blocks.amin(-1)
    assert (s_hat >= true * (1 - 1e-6)).all()  # scales rounded up: no clipping
    assert (s_hat <= scale_upper_bound(blocks, codebook, dq)).all()
    err = (enc.y.detach() - x).reshape(T, -1, 64).abs().amax(-1)
    assert (err <= nf_error_bound(blocks, codebook, bits, dq)).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 8), codebook=st.sampled_from(["seed", "qlora"]),
    dq=st.booleans(), scale=st.floats(1e-3, 1e3), shift=st.floats(-100, 100),
)
def test_nf_roundtrip_property(seed, bits, codebook, dq, scale, shift):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 3, DIM), generator=g) * scale + shift
    spec = NF(DIM, bits, NFSettings(block=32, codebook=codebook, double_quant=dq))
    client, server = spec.client(), spec.server()
    enc, p, y_hat = roundtrip(client, server, x)
    assert torch.equal(bits_of(y_hat), bits_of(enc.y))
    err = (y_hat - x).reshape(3, -1, 32).abs().amax(-1)
    assert (err <= nf_error_bound(x.reshape(3, -1, 32), codebook, bits, dq)).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_topk_keeps_the_largest_values_in_fp16(bits):
    client, server = make("topk", bits)
    x = torch.randn(SHAPE)
    enc, _, y_hat = roundtrip(client, server, x)
    kept = y_hat != 0
    assert (kept.sum(-1) == client.m).all()
    assert torch.equal(y_hat[kept], x[kept].half().float())
    kth = x.abs().topk(client.k, dim=-1).values[..., -1:]
    assert (x.abs()[~kept].reshape(*SHAPE[:2], -1) <= kth).all()  # nothing bigger was dropped


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 16), share=st.floats(0.0, 0.5), dim=st.sampled_from([16, 100, 128]))
def test_topk_roundtrip_property(seed, bits, share, dim):
    x = torch.randn((2, 3, dim), generator=torch.Generator().manual_seed(seed))
    spec = TopK(dim, bits, TopKSettings(random=share), seed)
    client, server = spec.client(), spec.server()
    enc, p, y_hat = roundtrip(client, server, x)
    assert torch.equal(bits_of(y_hat), bits_of(enc.y))
    assert p.nbytes == expected_nbytes("topk", bits, {"random": share}, rows=6, dim=dim) - (
        2 * 6 * (round(share * dim) - client.r)  # r is capped at D - k
    )


def test_topk_random_share_is_a_function_of_seed_and_input():
    x = torch.randn(SHAPE)
    a, b = spec_of("topk", 2, seed=7).client(), spec_of("topk", 2, seed=7).client()
    pa, pb = a(x).side["positions"], b(x).side["positions"]
    assert torch.equal(pa, pb)
    assert torch.equal(a(x).side["positions"], pa)  # a recomputed forward selects the same positions
    assert not torch.equal(a(x + 1e-3).side["positions"], pa)  # other features: other random extras
    assert not torch.equal(spec_of("topk", 2, seed=8).client()(x).side["positions"], pa)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name,bits,kw", VARIANTS, ids=map(vid, VARIANTS))
def test_ste_gradient(name, bits, kw):
    client, _ = make(name, bits, **kw)
    x = torch.randn(SHAPE, requires_grad=True)
    enc = client(x)
    g = torch.randn(SHAPE)
    (enc.y * g).sum().backward()
    assert x.grad.abs().sum() > 0
    if name == "nf":
        assert torch.equal(x.grad, g)  # identity STE
    if name == "topk":  # gradient of the scatter: upstream at kept positions, 0 elsewhere
        mask = torch.zeros(T, DIM).scatter_(1, enc.side["positions"], 1.0).reshape(SHAPE)
        assert torch.equal(x.grad, g * mask)


def test_fsq_ste_goes_through_tanh():
    client, _ = make("fsq", 2)
    identity_proj(client)
    x = torch.randn(SHAPE, requires_grad=True)
    g = torch.randn(SHAPE)
    (client(x).y * g).sum().backward()
    assert torch.allclose(x.grad, g * (1 - torch.tanh(x.detach()) ** 2), atol=1e-6)


# ---------------------------------------------------------------- malformed payloads
@pytest.mark.parametrize("name,bits,kw", VARIANTS, ids=map(vid, VARIANTS))
def test_malformed_payloads_raise_payload_error(name, bits, kw):
    client, server = make(name, bits, **kw)
    assert_rejects_malformed(client, server, torch.randn(SHAPE))


@pytest.mark.parametrize("dq", [False, True])
def test_nf_rejects_negative_scales_and_wrong_block_count(dq):
    client, server = make("nf", 4, codebook="qlora", double_quant=dq)
    arrays = client.pack(client(torch.randn(SHAPE))).arrays()
    key = "side.token_scale" if dq else "side.scale"
    bad = arrays[key].copy()
    bad[1] = -1
    with pytest.raises(PayloadError, match="negative"):
        server.unpack(Payload.from_arrays({**arrays, key: bad}), SHAPE)
    other = spec_of("nf", 4, block=32, codebook="qlora", double_quant=dq).server()  # expects twice the blocks
    with pytest.raises(PayloadError):
        other.unpack(Payload.from_arrays(arrays), SHAPE)


def test_nf_rejects_dim_not_divisible_by_block():
    with pytest.raises(ValueError, match="must divide the feature width"):
        NF(100, 4, NFSettings(block=64))  # the definition both halves are built from
    with pytest.raises(ValueError, match="must divide the feature width"):
        NF.check(NFSettings(block=64), 4, 100)
    with pytest.raises(ValueError, match="divisible"):
        BlockNF(4, 64).encode(torch.zeros(2, 100))
    with pytest.raises(PayloadError, match="divisible"):
        BlockNF(4, 64).unpack({}, 2, 100)
    NF(100, 4, NFSettings(block=25))  # a block that divides the width is fine
    with pytest.raises(ValueError):
        NF(DIM, 9)


def test_topk_rejects_bad_positions():
    dim = 100  # 7-bit indices can say 100..127: out of range
    spec = TopK(dim, 1, TopKSettings(random=0.0))
    client, server = spec.client(), spec.server()
    shape = (2, 6, dim)
    arrays = client.pack(client(torch.randn(shape))).arrays()
    assert arrays["side.format"][0] == 1
    idx = unpack_bits(arrays["side.positions"], 7, T * client.m).reshape(T, client.m)
    for mutate in ("range", "dup"):
        bad = idx.copy()
        if mutate == "range":
            bad[3, -1] = 120
        else:
            bad[3, 1] = bad[3, 0]
        with pytest.raises(PayloadError):
            server.unpack(Payload.from_arrays({**arrays, "side.positions": pack_bits(bad, 7)}), shape)
    with pytest.raises(PayloadError, match="format"):
        server.unpack(Payload.from_arrays({**arrays, "side.format": np.array([2], np.uint8)}), shape)
    # a bitmask flag with a buffer of the index-list size is rejected by length
    with pytest.raises(PayloadError):
        server.unpack(Payload.from_arrays({**arrays, "side.format": np.array([0], np.uint8)}), shape)


def test_topk_rejects_bitmask_with_wrong_popcount():
    client, server = make("topk", 4)
    arrays = client.pack(client(torch.randn(SHAPE))).arrays()
    bad = arrays["side.positions"].copy()
    bad[0] ^= 1
    with pytest.raises(PayloadError, match="set bits"):
        server.unpack(Payload.from_arrays({**arrays, "side.positions": bad}), SHAPE)


# ---------------------------------------------------------------- references
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_fsq_matches_vector_quantize_pytorch_symmetric_fsq(bits):
    from vector_quantize_pytorch import FSQ as ReferenceFSQ

    K, h = 2**bits, (2**bits - 1) / 2
    ref = ReferenceFSQ(levels=[K], preserve_symmetry=True)  # dim 1 = codebook dim: no projections
    assert not ref.has_projections
    z = torch.randn(1, 50_000, 1, generator=torch.Generator().manual_seed(bits)) * 2
    ref_val, ref_idx = ref(z)
    client = identity_proj(FSQ(1, bits).client())  # the codec without its projection
    with torch.no_grad():
        enc = client(z)
    idx, val = enc.codes, enc.y
    # same index I = floor(h t + h + 1/2) = z + h and same value (I - h)/h: no scale factor;
    # only inputs within float32 rounding of a decision boundary may differ (tie-breaking)
    v = h * torch.tanh(z) + h + 0.5
    near = (v - v.round()).abs() < 1e-4
    diff = ref_idx.reshape(-1) != idx.reshape(-1)
    assert not (diff & ~near.reshape(-1)).any()
    same = ~diff
    assert torch.allclose(ref_val.reshape(-1)[same], val.reshape(-1)[same], atol=1e-6)


def test_qlora_nf4_codebook_matches_bitsandbytes_table():
    assert qlora_offset(4) == pytest.approx(0.9677083, abs=1e-7)
    assert torch.allclose(qlora_codebook(4), torch.tensor(NF4_PUBLISHED), atol=1e-4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_shapes(bits):
    q = qlora_codebook(bits)
    assert len(q) == 2**bits and (q[1:] > q[:-1]).all() and q.max() == 1.0
    assert (q == 0).sum() == 1 and (q > 0).sum() == 2 ** (bits - 1) and (q < 0).sum() == 2 ** (bits - 1) - 1
    if bits > 1:
        assert q.min() == -1.0
    s = seed_codebook(bits)
    assert len(s) == 2**bits and (s[1:] > s[:-1]).all() and torch.allclose(s, -s.flip(0))
    assert s.max() == 1.0 and (s != 0).all()
