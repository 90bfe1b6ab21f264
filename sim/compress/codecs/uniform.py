"""Uniform scalar quantisation with per-token min/max: the plain baseline the papers lack.

Every token (row of ``D`` feature values) is quantised on its own ``K = 2^b``-level
uniform grid spanning the row's range::

    lo = min_d x_d (fp16, rounded down)     span = max_d x_d - lo (fp16, rounded up)
    step = span / (K - 1)                   I_d = round((x_d - lo) / step) in {0..K-1}
    x_hat_d = lo + I_d * step

The indices cross the wire packed at ``b`` bits (``codes.index``); the side information
is the fp16 ``lo`` and ``span`` of every token (``side.lo``, ``side.span``: 4 bytes per
token). The directed fp16 rounding keeps each row inside ``[lo, lo + span]``, so the
error is at most half a step plus fp16 rounding of the reconstruction. Both ends compute
``x_hat`` from the transmitted fp16 values with the same function, so the client's ``y``
is bitwise the server's reconstruction; the gradient is the straight-through identity.

Unlike RD-FSQ (Quantized-TinyLLaVA, arXiv 2511.23402) it has no learned projection, no
statistics over the batch and no clipping: what it costs is the side information, and
what it loses on heavy-tailed rows (a few large values stretch every step).

Data flow: ``x (B,N,D) -> per-token lo/span (fp16) -> round on the row's 2^b-level grid
-> I (b bits) + lo, span -> lo + I * span / (K - 1)``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base import (
    ClientCodec, Codec, Encoded, IndexLayout, Layout, Payload, PayloadError, ServerCodec, WireArray, fp16_directed,
    numel, require_finite, rows_of, straight_through,
)
from ..packing import pack_bits, packed_nbytes, unpack_codes


def reconstruct(index: torch.Tensor, lo16: torch.Tensor, span16: torch.Tensor, levels: int) -> torch.Tensor:
    """``lo + I * span / (K - 1)`` for indices ``(T, D)`` and fp16 side values ``(T,)``; the
    same on both ends."""
    lo, step = lo16.float()[:, None], (span16.float() / (levels - 1))[:, None]
    return lo + index.to(torch.float32) * step + 0.0  # + 0.0: -0.0 -> +0.0, so the STE sum is bitwise equal


class UniformClient(ClientCodec):
    """Client half: per-token range, uniform rounding, b-bit packing."""

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        self.check_input(x)
        x2 = x.detach().reshape(-1, self.dim).float()
        lo16 = fp16_directed(x2.amin(-1), up=False)
        span16 = fp16_directed(x2.amax(-1) - lo16.float(), up=True)
        levels = 2**self.bits
        step = (span16.float() / (levels - 1)).clamp_min(1e-30)[:, None]
        index = torch.round((x2 - lo16.float()[:, None]) / step).clamp(0, levels - 1).to(torch.int64)
        y = straight_through(reconstruct(index, lo16, span16, levels).reshape(x.shape), x)
        return Encoded(y=y, codes=index, aux_loss=x.new_zeros(()), side={"lo": lo16, "span": span16})

    def pack(self, enc: Encoded) -> Payload:
        codes = enc.codes.numpy()
        side = {k: v.detach().cpu().numpy().reshape(-1) for k, v in enc.side.items()}
        return Payload(codes={"index": pack_bits(codes, self.bits)}, side=side, ideal_bits=float(codes.size * self.bits))


class UniformServer(ServerCodec):
    """Server half: unpack, validate the side information, rebuild on each token's grid."""

    def decode(self, arrays: dict[str, np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:
        lo, span = arrays["side.lo"], arrays["side.span"]
        require_finite("lo", lo)
        require_finite("span", span)
        if (span < 0).any():
            raise PayloadError("payload array 'span' has a negative token range")
        rows = rows_of(shape)
        index = unpack_codes(arrays["codes.index"], self.bits, numel(shape))
        x_hat = reconstruct(torch.from_numpy(index).reshape(rows, self.dim), torch.from_numpy(lo.copy()),
                            torch.from_numpy(span.copy()), 2**self.bits)
        if not torch.isfinite(x_hat).all():
            raise PayloadError("the token ranges overflow float32")
        return x_hat.reshape(shape)


class Uniform(Codec):
    name = "uniform"
    summary = "uniform scalar quantisation on each token's own min/max range (fp16 side info per token)"
    streams = frozenset({"image", "residual", "text"})
    bit_range = (1, 8)
    integer_codes = True
    Client, Server = UniformClient, UniformServer

    def layout(self, shape: tuple[int, ...]) -> Layout:
        rows = rows_of(shape)
        return {"codes.index": WireArray("uint8", packed_nbytes(numel(shape), self.bits)),
                "side.lo": WireArray("float16", rows), "side.span": WireArray("float16", rows)}

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return numel(shape), self.bits, 2**self.bits


CODEC = Uniform
