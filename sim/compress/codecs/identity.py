"""Identity compressor: features cross the wire as fp16 (default), bf16 or fp32.

This is the baseline every compression ratio is measured against (Quantized-TinyLLaVA,
arXiv 2511.23402, reports its ratios against fp16). The cast is straight-through, so the
client receives exactly the gradient the server computed.

Data flow: ``x (B,N,D) -> cast to the wire dtype -> codes.values -> float32``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sim.settings import option

from ..base import (
    ClientCodec, Codec, Encoded, Layout, Payload, PayloadError, ServerCodec, WireArray, numel, require_finite,
    straight_through,
)

_WIRE = {"fp16": (torch.float16, "float16", 16), "fp32": (torch.float32, "float32", 32), "bf16": (torch.bfloat16, "uint16", 16)}


@dataclass(frozen=True)
class IdentitySettings:
    dtype: str = option("fp16", "wire dtype of the identity compressor (bf16 travels as uint16 bit patterns)",
                        choices=("fp16", "bf16", "fp32"))


class IdentityClient(ClientCodec):
    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        cast = x.detach().to(_WIRE[self.spec.settings.dtype][0])
        y = straight_through(cast.float(), x)
        return Encoded(y=y, codes=cast, aux_loss=x.new_zeros(()))

    def pack(self, enc: Encoded) -> Payload:
        t = enc.codes.contiguous()
        dtype = self.spec.settings.dtype
        arr = t.view(torch.int16).numpy().view(np.uint16).reshape(-1) if dtype == "bf16" else t.numpy().reshape(-1)
        return Payload(codes={"values": arr}, ideal_bits=float(arr.size * _WIRE[dtype][2]))


class IdentityServer(ServerCodec):
    def decode(self, arrays: dict[str, np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:
        a = arrays["codes.values"]
        if self.spec.settings.dtype == "bf16":
            t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            require_finite("values", a)
            t = torch.from_numpy(a.copy())
        t = t.float().reshape(shape)
        if not torch.isfinite(t).all():
            raise PayloadError("payload array 'values' contains NaN or inf")
        return t


class Identity(Codec):
    name = "identity"
    summary = "features as fp16/bf16/fp32: the uncompressed baseline"
    streams = frozenset({"image", "residual", "text"})
    bit_unit = None  # the width is the dtype's
    Settings = IdentitySettings
    sweep = {"identity-dtype": "fp16"}
    Client, Server = IdentityClient, IdentityServer

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return {"codes.values": WireArray(_WIRE[self.settings.dtype][1], numel(shape))}


CODEC = Identity
