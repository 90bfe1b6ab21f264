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
