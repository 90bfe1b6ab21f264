"""FSQ: finite scalar quantisation (Mentzer et al. 2023), the baseline of paper 000.

Paper 000 (Quantized-TinyLLaVA), Algorithm 1 "FSQ procedure":

1. ``e = tanh(E_phi(X))`` with a learned linear layer ``E_phi`` on the client;
2. with ``K = 2^b`` levels and ``h = (K-1)/2``: ``z = round(h e)`` for odd K,
   ``z = round(h e - 0.5) + 0.5`` for even K (symmetric around 0);
3. the index ``I = z + h`` in ``{0..K-1}`` crosses the wire, packed at b bits;
4. the server rebuilds ``C = (I - h) / h`` in [-1, 1] and a learned linear layer
   maps it to the LLM's input space. Gradients pass the rounding straight through
   (to ``e``, hence through ``tanh`` and ``E_phi``).

The grid and rounding are the ones of :mod:`sim.compress.rdfsq`; only the bound
differs (``tanh`` instead of the 3-sigma clip). No side information is sent, so the
payload is exactly ``ceil(B*N*D*b / 8)`` bytes and there is no auxiliary loss.

Relation to ``vector_quantize_pytorch.FSQ(levels=[K], preserve_symmetry=True)``: it
computes ``I' = floor((K-1)(tanh(x)+1)/2 + 0.5)`` and returns ``2 I'/(K-1) - 1``.
Since ``(K-1)(t+1)/2 + 0.5 = h t + h + 0.5`` this is the same index as ours and the
same value ``(I-h)/h`` (no scale factor between the two); the only differences are
the tie-breaking at exact decision boundaries (``floor(v + 0.5)`` rounds half up,
``torch.round`` half to even) and float32 rounding of the two algebraically equal
expressions, both confined to inputs within ~1 ulp of a boundary.

Data flow: ``x (B,N,D) -> Linear -> tanh -> round on K-grid -> I (b bits) ->
(I-h)/h -> Linear``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ClientCodec, Encoded, IndexLayout, Payload, PayloadError, ServerCodec, require_array, straight_through
from .packing import PackError, pack_bits, packed_nbytes, unpack_bits
from .rdfsq import index_to_value, round_to_grid


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"fsq bits must be in 1..8, got {bits}")


def fsq_quantize(z: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 1 lines 1-8 without the projections: ``(index I, value C)`` of ``tanh(z)``."""
    _, index = round_to_grid(torch.tanh(z), levels)
    return index, index_to_value(index, levels)


class FSQClient(ClientCodec):
    """Client half: optional projection, tanh bound, K-level rounding, b-bit packing."""

    def __init__(self, dim: int, bits: int, project: bool = True) -> None:
        super().__init__()
        _check_bits(bits)
        self.dim, self.bits, self.levels = dim, bits, 2**bits
        self.proj: nn.Module = nn.Linear(dim, dim) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        if x.shape[-1] != self.dim:
            raise ValueError(f"fsq expects feature dim {self.dim}, got {x.shape[-1]}")
        e = torch.tanh(self.proj(x))
        _, index = round_to_grid(e.detach(), self.levels)
        y = straight_through(index_to_value(index, self.levels), e)
        return Encoded(y=y, codes=index, aux_loss=x.new_zeros(()))

    def pack(self, enc: Encoded) -> Payload:
        codes = enc.codes.detach().cpu().numpy()
        return Payload(codes={"index": pack_bits(codes, self.bits)}, ideal_bits=codes.size * math.log2(self.levels))

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return int(math.prod(shape)), self.bits, self.levels


class FSQServer(ServerCodec):
    """Server half: unpack, ``C = (I - h)/h``, optional learned projection."""

    def __init__(self, dim: int, bits: int, project: bool = True) -> None:
        super().__init__()
        _check_bits(bits)
        self.dim, self.bits, self.levels = dim, bits, 2**bits
        self.proj: nn.Module = nn.Linear(dim, dim) if project else nn.Identity()

    def unpack(self, payload: Payload, shape: tuple[int, int, int]) -> torch.Tensor:
        if len(shape) != 3 or shape[-1] != self.dim:
            raise PayloadError(f"expected shape (B, N, {self.dim}), got {tuple(shape)}")
        count = int(math.prod(shape))
        buf = require_array(payload.codes, "index", "uint8", packed_nbytes(count, self.bits))
        if set(payload.codes) != {"index"} or payload.side:
            raise PayloadError(f"fsq payload has unexpected arrays: {sorted(Payload.arrays(payload))}")
        try:
            index = unpack_bits(buf, self.bits, count)
        except PackError as err:
            raise PayloadError(str(err)) from None
        return index_to_value(torch.from_numpy(index), self.levels).reshape(shape)

    def array_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        return {"codes.index": packed_nbytes(int(math.prod(shape)), self.bits)}

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return int(math.prod(shape)), self.bits, self.levels

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return self.proj(y_hat)
