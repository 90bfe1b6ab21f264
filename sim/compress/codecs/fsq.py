"""FSQ: finite scalar quantisation (Mentzer et al., arXiv 2309.15505), Quantized-TinyLLaVA's baseline.

Quantized-TinyLLaVA (arXiv 2511.23402), Algorithm 1 "FSQ procedure":

1. ``e = tanh(E_phi(X))`` with a learned linear layer ``E_phi`` on the client;
2. with ``K = 2^b`` levels and ``h = (K-1)/2``: ``z = round(h e)`` for odd K,
   ``z = round(h e - 0.5) + 0.5`` for even K (symmetric around 0);
3. the index ``I = z + h`` in ``{0..K-1}`` crosses the wire, packed at b bits;
4. the server rebuilds ``C = (I - h) / h`` in [-1, 1] and a learned linear layer
   maps it to the LLM's input space. Gradients pass the rounding straight through
   (to ``e``, hence through ``tanh`` and ``E_phi``).

The grid and rounding are the ones of :mod:`sim.compress.codecs.rdfsq`; only the bound
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

import numpy as np
import torch
from torch import nn

from ..base import (
    ClientCodec, Codec, Encoded, IndexLayout, Layout, Payload, ServerCodec, WireArray, numel, straight_through,
)
from ..packing import pack_bits, packed_nbytes, unpack_codes
from .rdfsq import index_to_value, round_to_grid


class FSQClient(ClientCodec):
    """Client half: projection, tanh bound, K-level rounding, b-bit packing."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        self.levels = 2**self.bits
        self.proj = nn.Linear(self.dim, self.dim)

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        self.check_input(x)
        e = torch.tanh(self.proj(x))
        _, index = round_to_grid(e.detach(), self.levels)
        y = straight_through(index_to_value(index, self.levels), e)
        return Encoded(y=y, codes=index, aux_loss=x.new_zeros(()))

    def pack(self, enc: Encoded) -> Payload:
        codes = enc.codes.detach().cpu().numpy()
        return Payload(codes={"index": pack_bits(codes, self.bits)}, ideal_bits=codes.size * math.log2(self.levels))


class FSQServer(ServerCodec):
    """Server half: unpack, ``C = (I - h)/h``, learned projection."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        self.levels = 2**self.bits
        self.proj = nn.Linear(self.dim, self.dim)

    def decode(self, arrays: dict[str, np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:
        index = unpack_codes(arrays["codes.index"], self.bits, numel(shape))
        return index_to_value(torch.from_numpy(index), self.levels).reshape(shape)

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return self.proj(y_hat)


class FSQ(Codec):
    name = "fsq"
    summary = "FSQ (Mentzer et al.): tanh bound, symmetric 2^b-level grid, learned projections"
    streams = frozenset({"image", "residual", "text"})
    bit_range = (1, 8)
    integer_codes = True
    Client, Server = FSQClient, FSQServer

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return {"codes.index": WireArray("uint8", packed_nbytes(numel(shape), self.bits))}

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return numel(shape), self.bits, 2**self.bits


CODEC = FSQ
