"""RD-FSQ: the rate-distortion finite scalar quantiser of Quantized-TinyLLaVA.

Paper 000 (Quantized-TinyLLaVA), section 3.1 and Algorithm 2:

1. a learned linear layer ``E_phi`` on the client;
2. clip to ``[mu - 3 sigma, mu + 3 sigma]`` and scale linearly to ``e in [-1, 1]``;
3. with ``K = 2^b`` levels and ``h = (K-1)/2``: ``z = round(h e)`` for odd K,
   ``z = round(h e - 0.5) + 0.5`` for even K; the index ``I = z + h`` crosses the
   wire, packed at b bits per value;
4. the server rebuilds ``C = (I - h) / h`` on the symmetric K-level grid and a
   learned linear layer maps it to the LLM's space;
5. commitment (distortion) loss ``alpha * (1 - cos(h e, sg(z)))`` per token, added
   on the client; gradients pass the rounding straight through.

``stats`` selects the statistics: ``global`` (batch-global scalars, the seed
code's choice) or ``per-dim`` (one mean/std per feature dimension over the batch's
tokens). In both the clip range is not transmitted: the server-side projection
absorbs the scale, so the payload is exactly ``B*N*D*b/8`` bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ClientCodec, Encoded, Payload, PayloadError, ServerCodec, require_array, straight_through
from .packing import PackError, pack_bits, packed_nbytes, unpack_bits

STATS = ("global", "per-dim")


def clip_and_scale(z: torch.Tensor, stats: str) -> torch.Tensor:
    """Clip ``z`` (B,N,D) to mean +- 3 std and scale linearly to [-1, 1]."""
    if stats == "global":
        mu, sigma = z.mean(), z.std()
    elif stats == "per-dim":
        flat = z.reshape(-1, z.shape[-1])
        mu, sigma = flat.mean(0), flat.std(0)
    else:
        raise ValueError(f"rdfsq stats must be one of {STATS}, got {stats!r}")
    mu, half = mu.detach(), (3.0 * sigma.detach()).clamp_min(1e-6)
    return (torch.minimum(torch.maximum(z, mu - half), mu + half) - mu) / half


def round_to_grid(e: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Alg. 2 lines 2-7: integer grid point ``z`` and index ``I = z + h``."""
    h = (levels - 1) / 2
    if levels % 2:
        z = torch.round(h * e)
    else:
        z = torch.round(h * e - 0.5) + 0.5
    z = z.clamp(-h, h)
    return z, (z + h).to(torch.int64)


def index_to_value(index: torch.Tensor, levels: int) -> torch.Tensor:
    """Paper Alg. 2 line 8: ``C = (I - h) / h`` in [-1, 1]."""
    h = (levels - 1) / 2
    return (index.to(torch.float32) - h) / h


class RDFSQClient(ClientCodec):
    """Client half: projection, clip/scale, rounding, packing."""

    def __init__(self, dim: int, bits: int, stats: str = "global", alpha: float = 0.25) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"rdfsq bits must be in 1..8, got {bits}")
        if stats not in STATS:
            raise ValueError(f"rdfsq stats must be one of {STATS}, got {stats!r}")
        self.bits, self.levels, self.stats, self.alpha = bits, 2**bits, stats, alpha
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        e = clip_and_scale(self.proj(x), self.stats)
        z, index = round_to_grid(e.detach(), self.levels)
        h = (self.levels - 1) / 2
        cos = F.cosine_similarity(h * e, z, dim=-1, eps=1e-8)
        aux = self.alpha * (1.0 - cos).mean()
        y = straight_through(index_to_value(index, self.levels), e)
        return Encoded(y=y, codes=index, aux_loss=aux)

    def pack(self, enc: Encoded) -> Payload:
        codes = enc.codes.numpy()
        return Payload(codes={"index": pack_bits(codes, self.bits)}, ideal_bits=codes.size * math.log2(self.levels))


class RDFSQServer(ServerCodec):
    """Server half: unpack, rebuild the grid values, learned projection."""

    def __init__(self, dim: int, bits: int) -> None:
        super().__init__()
        self.dim, self.bits, self.levels = dim, bits, 2**bits
        self.proj = nn.Linear(dim, dim)

    def unpack(self, payload: Payload, shape: tuple[int, int, int]) -> torch.Tensor:
        if shape[-1] != self.dim:
            raise PayloadError(f"feature dim {shape[-1]} != {self.dim}")
        count = int(math.prod(shape))
        buf = require_array(payload.codes, "index", "uint8", packed_nbytes(count, self.bits))
        try:
            index = unpack_bits(buf, self.bits, count)
        except PackError as err:
            raise PayloadError(str(err)) from None
        return index_to_value(torch.from_numpy(index), self.levels).reshape(shape)

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return self.proj(y_hat)
