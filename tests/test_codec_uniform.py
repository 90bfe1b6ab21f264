"""The ``uniform`` codec (sim/compress/codecs/uniform.py) against an independent NumPy
reference, its exact payload size and error bound, and a run that uses it end to end."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.compress import Payload, PayloadError, codec_names, make_codec
from sim.training.reference import run_reference

from conftest import scratch_cfg
from payload_checks import assert_rejects_malformed

DIM = 48


def numpy_reference(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and reconstruction of per-row uniform quantisation, written from the formula
    (float64 NumPy; the fp16 side values are rounded outwards with np.nextafter)."""
    lo = x.min(-1).astype(np.float16)
    lo = np.where(lo.astype(np.float64) > x.min(-1), np.nextafter(lo, np.float16(-np.inf)), lo)
    span = (x.max(-1) - lo.astype(np.float32)).astype(np.float16)
    span = np.where(span.astype(np.float64) < x.max(-1) - lo.astype(np.float32), np.nextafter(span, np.float16(np.inf)), span)
    k = 2**bits - 1
    step = np.maximum(span.astype(np.float64) / k, 1e-30)[:, None]
    idx = np.clip(np.rint((x - lo.astype(np.float64)[:, None]) / step), 0, k).astype(np.int64)
    return idx, lo.astype(np.float64)[:, None] + idx * (span.astype(np.float64) / k)[:, None]


def test_uniform_is_registered_for_the_feature_streams():
    assert "uniform" in codec_names("image") and "uniform" in codec_names("text")
    assert "uniform" not in codec_names("gradient")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 8), scale=st.floats(1e-2, 1e3), rows=st.integers(1, 7))
def test_matches_the_numpy_reference(seed, bits, scale, rows):
    x = torch.randn(1, rows, DIM, generator=torch.Generator().manual_seed(seed)) * scale
    client = make_codec("uniform", DIM, bits).client()
    enc = client(x)
    ref_idx, ref_y = numpy_reference(x[0].double().numpy(), bits)
    # the same index except where the scaled value sits within float32 rounding of a half-step boundary
    scaled = (x[0].double().numpy() - enc.side["lo"].double().numpy()[:, None]) / (
        enc.side["span"].double().numpy()[:, None] / (2**bits - 1))
    clear = np.abs(scaled - np.floor(scaled) - 0.5) > 1e-4
    np.testing.assert_array_equal(enc.codes.numpy()[clear], ref_idx[clear])
    np.testing.assert_allclose(enc.y[0].double().numpy()[clear], ref_y[clear], rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_payload_is_the_packed_codes_plus_four_bytes_per_token(bits):
    spec = make_codec("uniform", DIM, bits)
    client, server = spec.client(), spec.server()
    x = torch.randn(3, 5, DIM)
    enc = client(x)
    p = client.pack(enc)
    assert p.code_bytes == math.ceil(3 * 5 * DIM * bits / 8) and p.side_bytes == 4 * 3 * 5
    assert {k: a.size for k, a in p.arrays().items()} == {k: a.count for k, a in spec.layout(x.shape).items()}
    y_hat = server.unpack(Payload.from_arrays(p.arrays()), tuple(x.shape))
    assert torch.equal(y_hat, enc.y)  # the server rebuilds exactly what the client used
    step = (enc.side["span"].float() / (2**bits - 1)).reshape(3, 5, 1)
    assert ((y_hat - x).abs() <= step / 2 + 1e-3 * x.abs().amax(-1, keepdim=True) + 1e-6).all()


def test_constant_tokens_and_the_gradient():
    client = make_codec("uniform", DIM, 2).client()
    x = torch.full((1, 2, DIM), 0.5).requires_grad_(True)
    enc = client(x)
    assert torch.equal(enc.y.detach(), torch.full_like(x, 0.5)) and enc.side["span"].eq(0).all()
    up = torch.randn_like(x)
    (enc.y * up).sum().backward()
    assert torch.equal(x.grad, up)  # straight-through: the upstream gradient unchanged


def test_malformed_payloads_are_rejected():
    spec = make_codec("uniform", DIM, 3)
    client, server = spec.client(), spec.server()
    x = torch.randn(2, 4, DIM)
    assert_rejects_malformed(client, server, x)
    arrays = client.pack(client(x)).arrays()
    bad = arrays["side.span"].copy()
    bad[1] = -1.0
    with pytest.raises(PayloadError, match="negative"):
        server.unpack(Payload.from_arrays({**arrays, "side.span": bad}), tuple(x.shape))


def test_a_run_with_the_uniform_codec(tmp_path):
    cfg = scratch_cfg(compressor="uniform", bits=3, num_server_rounds=1, local_steps=2, steps_per_exchange=1,
                      batch_size=4, num_samples=120, hidden_size=32, image_size=16, patch_size=4,
                      entropy_coding="ans", out_dir=str(tmp_path))
    res = run_reference(cfg, 2)
    assert len(res.step_losses) == 2 and all(math.isfinite(v) for v in res.step_losses)
    up = [r for r in res.ledger.rows if r.direction == "up" and r.samples]
    assert up and all(r.feature_bytes > 0 for r in up)
    assert 0.0 <= res.accuracy[-1] <= 1.0
