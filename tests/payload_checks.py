"""Shared check: a server half rejects every malformed version of a good payload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.compress import Payload, PayloadError


def assert_rejects_malformed(client, server, x) -> None:
    """Wrong length, dtype, rank, a missing or extra array, NaN values and wrong shapes
    of a payload of ``x`` (B, N, D) must each raise :class:`PayloadError`."""
    shape = tuple(x.shape)
    with torch.no_grad():
        enc = client(x)
    arrays = client.pack(enc).arrays()
    # the good payload is exactly the declared layout and decodes (so each rejection below is the mutation's)
    layout = server.spec.layout(shape)
    assert {k: (a.dtype, a.shape) for k, a in arrays.items()} == {k: (np.dtype(w.dtype), (w.count,)) for k, w in layout.items()}
    assert torch.equal(server.unpack(Payload.from_arrays(arrays), shape), enc.y)

    def rejects(bad, shape=shape):
        with pytest.raises(PayloadError):
            server.unpack(Payload.from_arrays(bad), shape)

    for key, good in arrays.items():
        other = np.int32 if good.dtype != np.int32 else np.int64
        for bad in (good[:-1], np.concatenate([good, good[:1]]), good.astype(other), good.reshape(1, -1)):
            rejects({**arrays, key: bad})  # wrong length, wrong dtype, wrong rank
        rejects({k: v for k, v in arrays.items() if k != key})  # missing
        if good.dtype.kind == "f":  # NaN values / scales / ranges
            nan = good.copy()
            nan[0] = np.nan
            rejects({**arrays, key: nan})
    rejects({**arrays, "side.extra": np.zeros(1, np.uint8)})
    b, n, d = shape
    rejects(arrays, (b, n, d + 1))  # wrong feature width
    rejects(arrays, (b, n + 1, d))  # wrong token count: every block / code count changes


def assert_rejects_malformed_gradient(codec, g) -> None:
    """The same for a gradient codec (``encode_gradient`` / ``decode_gradient``): every
    array too short, too long, of another dtype or rank, missing, NaN or inf (float
    arrays), an extra array and a wrong shape must each raise :class:`PayloadError`."""
    shape = tuple(g.shape)
    arrays = codec.encode_gradient(g)
    layout = codec.gradient_layout(shape)
    assert {k: (a.dtype, a.shape) for k, a in arrays.items()} == {k: (np.dtype(w.dtype), (w.count,)) for k, w in layout.items()}
    assert torch.isfinite(codec.decode_gradient(arrays, shape)).all()  # the good payload decodes

    def rejects(bad, shape=shape):
        with pytest.raises(PayloadError):
            codec.decode_gradient(bad, shape)

    for key, good in arrays.items():
        other = np.int32 if good.dtype != np.int32 else np.int64
        for bad in (good[:-1], np.concatenate([good, good[:1]]), good.astype(other), good.reshape(1, -1)):
            rejects({**arrays, key: bad})
        rejects({k: v for k, v in arrays.items() if k != key})
        if good.dtype.kind == "f":
            for value in (np.nan, np.inf, -np.inf):
                bad = good.copy()
                bad[0] = value
                rejects({**arrays, key: bad})
    rejects({**arrays, "side.extra": np.zeros(1, np.uint8)})
    rejects(arrays, (*shape[:-1], shape[-1] + 1))
    rejects(arrays, (shape[0] + 1, *shape[1:]))
