"""``fp16``: the downlink gradient as a saturating half-precision cast (``grad-compressor=fp16``).

``2 n`` bytes for ``n`` values; values beyond the fp16 range saturate at +-65504 (NaN
stays NaN and is rejected by the receiver).

Data flow: ``g (any shape) -> clamp to +-65504 -> codes.values float16 -> float32``.
"""

from __future__ import annotations

import torch

from .none import NoCompression
from .topk import to_fp16


class FP16(NoCompression):
    name = "fp16"
    summary = "the gradient as saturating fp16"
    wire_dtype = "float16"

    def cast(self, g: torch.Tensor) -> torch.Tensor:
        return to_fp16(g)


CODEC = FP16
