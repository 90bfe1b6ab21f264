"""Identity compressor: features cross the wire as fp16 (default), bf16 or fp32.

This is the baseline every compression ratio is measured against (Quantized-
TinyLLaVA reports ratios against fp16). The cast is straight-through, so the
client receives exactly the gradient the server computed.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ClientCodec, Encoded, Payload, PayloadError, ServerCodec, require_array, require_finite, straight_through

_WIRE = {"fp16": (torch.float16, np.float16), "fp32": (torch.float32, np.float32), "bf16": (torch.bfloat16, np.uint16)}


def _wire_dtype(dtype: str) -> tuple[torch.dtype, np.dtype]:
    if dtype not in _WIRE:
        raise ValueError(f"identity dtype must be one of {sorted(_WIRE)}, got {dtype!r}")
    return _WIRE[dtype]


class IdentityClient(ClientCodec):
    def __init__(self, dim: int, dtype: str = "fp16") -> None:
        super().__init__()
        self.dim = dim
        self.dtype = dtype
        self._torch, self._np = _wire_dtype(dtype)

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        cast = x.detach().to(self._torch)
        y = straight_through(cast.float(), x)
        return Encoded(y=y, codes=cast, aux_loss=x.new_zeros(()))

    def pack(self, enc: Encoded) -> Payload:
        t = enc.codes.contiguous()
        if self.dtype == "bf16":
            arr = t.view(torch.int16).numpy().view(np.uint16).reshape(-1)
        else:
            arr = t.numpy().reshape(-1)
        bits = {"fp16": 16, "bf16": 16, "fp32": 32}[self.dtype]
        return Payload(codes={"values": arr}, ideal_bits=float(arr.size * bits))


class IdentityServer(ServerCodec):
    def __init__(self, dim: int, dtype: str = "fp16") -> None:
        super().__init__()
        self.dim = dim
        self.dtype = dtype
        self._torch, self._np = _wire_dtype(dtype)

    def unpack(self, payload: Payload, shape: tuple[int, int, int]) -> torch.Tensor:
        if len(shape) != 3 or shape[-1] != self.dim:
            raise PayloadError(f"expected shape (B, N, {self.dim}), got {tuple(shape)}")
        if set(payload.codes) != {"values"} or payload.side:
            raise PayloadError(f"identity payload must be exactly codes ['values'], got {sorted(payload.arrays())}")
        n = int(np.prod(shape))
        a = require_array(payload.codes, "values", self._np, n)
        if self.dtype == "bf16":
            t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            require_finite("values", a)
            t = torch.from_numpy(a.copy())
        t = t.float().reshape(shape)
        if not torch.isfinite(t).all():
            raise PayloadError("payload array 'values' contains NaN or inf")
        return t

    def array_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        return {"codes.values": int(np.prod(shape))}

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return y_hat
