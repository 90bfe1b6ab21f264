"""``none``: the downlink gradient uncompressed, as fp32 (``grad-compressor=none``, the default).

Quantized-TinyLLaVA (arXiv 2511.23402) compresses only the uplink; its gradients go back
as they are. This is that baseline: ``4 n`` bytes for ``n`` values.

Data flow: ``g (any shape) -> codes.values float32 -> g``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base import Codec, Layout, WireArray, check_layout, numel, require_finite


class NoCompression(Codec):
    name = "none"
    summary = "the gradient as fp32: no compression"
    streams = frozenset({"gradient"})
    bit_unit = None
    wire_dtype = "float32"  # a subclass that casts to another float dtype changes this and cast()

    def cast(self, g: torch.Tensor) -> torch.Tensor:
        return g.detach().float()

    def gradient_layout(self, shape: tuple[int, ...]) -> Layout:
        return {"codes.values": WireArray(self.wire_dtype, numel(shape))}

    def encode_gradient(self, g: torch.Tensor) -> dict[str, np.ndarray]:
        return {"codes.values": self.cast(g).cpu().numpy().reshape(-1)}

    def decode_gradient(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        a = check_layout(arrays, self.gradient_layout(shape), self.name)["codes.values"]
        require_finite("values", a)
        return torch.from_numpy(a.astype(np.float32)).reshape(shape)


CODEC = NoCompression
