"""``bf16``: the downlink gradient as bfloat16 (``grad-compressor=bf16``).

bfloat16 keeps float32's 8 exponent bits and 7 of its 23 mantissa bits, so unlike fp16 a
gradient neither underflows below 6e-8 nor saturates at 65504; it loses precision
instead (relative error at most 2^-8 with round-to-nearest-even). The format is from the
mixed-precision training literature (Kalamkar et al., "A Study of BFLOAT16 for Deep
Learning Training", arXiv 1905.12322). Flower's ``Array`` cannot hold a bfloat16 tensor,
so the values travel as their uint16 bit patterns (the top half of each float32) and
the receiver reinterprets them: ``2 n`` bytes for ``n`` values, like fp16.

Values beyond bfloat16's range (|g| > 3.39e38) saturate at its largest finite value; a
NaN or an infinite bit pattern from a peer is rejected.

Data flow: ``g (any shape) -> bfloat16 (round to nearest even) -> codes.values uint16
bit patterns -> bfloat16 -> float32``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base import PayloadError, check_layout
from .none import NoCompression

BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def to_bf16_bits(g: torch.Tensor) -> np.ndarray:
    """``g`` rounded to bfloat16 (saturating), as a flat uint16 array of bit patterns."""
    t = g.detach().float().clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16).contiguous()
    return t.view(torch.int16).cpu().numpy().view(np.uint16).reshape(-1)


def from_bf16_bits(a: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`to_bf16_bits`: float32 values (NaN/inf bit patterns included)."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16).float()


class BF16(NoCompression):
    name = "bf16"
    summary = "the gradient as bf16 (round to nearest even), sent as uint16 bit patterns"
    wire_dtype = "uint16"

    def encode_gradient(self, g: torch.Tensor) -> dict[str, np.ndarray]:
        return {"codes.values": to_bf16_bits(g)}

    def decode_gradient(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        a = check_layout(arrays, self.gradient_layout(shape), self.name)["codes.values"]
        out = from_bf16_bits(a)
        if not torch.isfinite(out).all():
            raise PayloadError("payload array 'values' holds NaN or inf bit patterns")
        return out.reshape(shape)


CODEC = BF16
