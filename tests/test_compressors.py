"""Every registered compressor: wire round trip, STE gradients, exact sizes, bad payloads."""

import hashlib
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import scratch_cfg

import sim.compress.codecs
from sim.compress import Payload, PayloadError, codec_names, get_codec, make_codec, register
from sim.compress.base import straight_through
from sim.compress.codecs.rdfsq import clip_and_scale, index_to_value, round_to_grid
from sim.config import SETTINGS, ConfigError

DIM = 32
SHAPE = (2, 6, DIM)


def codecs(name, bits=2, **kw):
    """Both halves of the image codec a config names (client first, as the model builds them)."""
    torch.manual_seed(0)
    spec = scratch_cfg(compressor=name, bits=bits, **kw).codec("image", DIM)
    return spec.client(), spec.server()


def variants():
    out = [("identity", 16, {}), ("identity", 16, {"identity_dtype": "fp32"}), ("identity", 16, {"identity_dtype": "bf16"})]
    out += [("rdfsq", b, {"rdfsq_stats": s}) for b in range(1, 9) for s in ("global", "per-dim")]
    return out


def test_registry_is_exact():
    folder = Path(sim.compress.codecs.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert list(codec_names()) == modules  # every module of the codec folder, and nothing else
    assert {"identity", "rdfsq", "fsq", "nf", "topk", "vq"} <= set(codec_names("image"))  # the papers' methods
    assert {"none", "fp16", "topk", "nf"} <= set(codec_names("gradient"))
    assert "vq" not in codec_names("text") and "none" not in codec_names("image")
    assert SETTINGS["compressor"].allowed() == codec_names("image")  # every config choice is registered
    assert SETTINGS["grad-compressor"].allowed() == codec_names("gradient")
    valid = re.escape(f"valid: {', '.join(codec_names())}")
    with pytest.raises(ValueError, match=valid):
        get_codec("rdfsq2")
    with pytest.raises(ValueError, match=valid):
        make_codec("rdfsq2", DIM, 2)
    with pytest.raises(ConfigError, match=re.escape(f"allowed values: {', '.join(codec_names('image'))}")):
        codecs("rdfsq2")  # the config accepts only codecs that serve the image stream
    with pytest.raises(ConfigError):
        codecs("none")  # a gradient-only codec
    with pytest.raises(ValueError, match="already registered"):
        register(get_codec("rdfsq"))
    with pytest.raises(TypeError):
        register(types.SimpleNamespace)  # not a Codec subclass


@pytest.mark.parametrize("name,bits,kw", variants())
def test_server_reconstructs_exactly_what_client_used(name, bits, kw):
    client, server = codecs(name, bits, **kw)
    x = torch.randn(SHAPE)
    enc = client(x)
    y_hat = server.unpack(Payload.from_arrays(client.pack(enc).arrays()), SHAPE)
    assert torch.equal(y_hat, enc.y.detach())


@pytest.mark.parametrize("bits", range(1, 9))
def test_rdfsq_payload_is_exactly_n_d_b_over_8(bits):
    client, _ = codecs("rdfsq", bits)
    p = client.pack(client(torch.randn(SHAPE)))
    n = int(np.prod(SHAPE))
    assert p.nbytes == n * bits // 8 and p.side_bytes == 0
    assert p.ideal_bits == n * bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_rdfsq_grid_matches_paper_algorithm(bits):
    K = 2**bits
    e = torch.linspace(-1, 1, 1001)
    z, idx = round_to_grid(e, K)
    assert idx.min() >= 0 and idx.max() <= K - 1 and len(torch.unique(idx)) == K
    grid = index_to_value(idx, K)
    # symmetric K-level grid in [-1, 1] (paper Alg. 2): the levels are -1 + 2i/(K-1)
    levels = index_to_value(torch.arange(K), K)
    assert torch.allclose(levels, torch.linspace(-1, 1, K), atol=1e-6) and torch.equal(levels, -levels.flip(0))
    assert (grid[:, None] == levels[None]).any(1).all()  # every value is exactly a grid level
    # ... and the nearest one, except at an exact tie between two levels (a decision boundary)
    nearest = levels[(e[:, None] - levels[None]).abs().argmin(1)]
    boundaries = (levels[1:] + levels[:-1]) / 2
    clear = (e[:, None] - boundaries[None]).abs().min(1).values > 1e-6
    assert clear.sum() >= len(e) - (K - 1)  # only inputs on a boundary are left out
    assert torch.equal(grid[clear], nearest[clear])
    assert (grid - e).abs().max() <= 1 / (K - 1) + 1e-6  # within half a step (ties included)


def test_clip_and_scale_bounds_and_stats():
    z = torch.randn(4, 8, 16) * 5 + 3
    e = clip_and_scale(z, "global")
    assert e.min() >= -1 and e.max() <= 1
    per = clip_and_scale(z, "per-dim")
    assert per.min() >= -1 and per.max() <= 1
    assert torch.isfinite(clip_and_scale(torch.ones(2, 3, 4), "global")).all()  # zero variance is safe


@pytest.mark.parametrize("name,bits,kw", variants())
def test_straight_through_gradient_reaches_the_input(name, bits, kw):
    client, _ = codecs(name, bits, **kw)
    x = torch.randn(SHAPE, requires_grad=True)
    enc = client(x)
    g = torch.randn(SHAPE)
    (enc.y * g).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if name == "identity":  # the cast is straight-through: the gradient is the upstream one
        assert torch.equal(x.grad, g)


def test_rdfsq_ste_passes_upstream_gradient_to_scaled_features():
    client, _ = codecs("rdfsq", 2)
    x = torch.randn(SHAPE)
    e = clip_and_scale(client.proj(x), "global")
    e.retain_grad()
    # recompute forward the way the codec does, through the same e
    _, idx = round_to_grid(e.detach(), 4)
    y = straight_through(index_to_value(idx, 4), e)
    g = torch.randn(SHAPE)
    (y * g).sum().backward()
    assert torch.equal(e.grad, g)


def test_rdfsq_commitment_loss_is_alpha_times_one_minus_cos():
    client, _ = codecs("rdfsq", 2, rdfsq_alpha=0.5)
    enc = client(torch.randn(SHAPE))
    assert 0 <= float(enc.aux_loss.detach()) <= 0.5 * 2
    client0, _ = codecs("rdfsq", 2, rdfsq_alpha=0.0)
    assert float(client0(torch.randn(SHAPE)).aux_loss.detach()) == 0.0


@pytest.mark.parametrize("name,bits,kw", variants())
def test_malformed_payloads_raise_clear_errors(name, bits, kw):
    client, server = codecs(name, bits, **kw)
    arrays = client.pack(client(torch.randn(SHAPE))).arrays()
    key = next(iter(arrays))
    good = arrays[key]
    bad_cases = {
        "short": good[:-1],
        "long": np.concatenate([good, good[:1]]),
        "dtype": good.astype(np.int32) if good.dtype != np.int32 else good.astype(np.int64),
        "rank": good.reshape(1, -1),
    }
    for why, bad in bad_cases.items():
        with pytest.raises(PayloadError):
            server.unpack(Payload.from_arrays({key: bad}), SHAPE)
    with pytest.raises(PayloadError):
        server.unpack(Payload.from_arrays({}), SHAPE)
    with pytest.raises(PayloadError):
        server.unpack(Payload.from_arrays(arrays), (2, 6, DIM + 1))


def test_identity_rejects_nan_values():
    client, server = codecs("identity")
    arrays = client.pack(client(torch.randn(SHAPE))).arrays()
    arrays["codes.values"][3] = np.nan
    with pytest.raises(PayloadError, match="NaN"):
        server.unpack(Payload.from_arrays(arrays), SHAPE)


def test_unknown_payload_array_names_are_rejected():
    with pytest.raises(PayloadError):
        Payload.from_arrays({"pixels": np.zeros(4, np.uint8)})


# A saved digest per codec: a silent change of the byte format fails here.
REFERENCE_DIGESTS = {
    ("rdfsq", 2): "d6665e51ab6673c0",
    ("identity", 16): "ccce904cc1f7dae6",
}


@pytest.mark.parametrize("name,bits", list(REFERENCE_DIGESTS))
def test_wire_format_is_stable(name, bits):
    client, _ = codecs(name, bits, rdfsq_stats="global")
    x = torch.linspace(-3, 3, int(np.prod(SHAPE))).reshape(SHAPE)
    p = client.pack(client(x))
    digest = hashlib.sha256(b"".join(a.tobytes() for a in p.arrays().values())).hexdigest()[:16]
    expected = REFERENCE_DIGESTS[(name, bits)]
    assert digest == expected, digest
