"""The ``feature-noise`` privacy defence: Gaussian noise on the client's pre-quantisation features.

Data flow (inside :meth:`sim.model.ClientModel.forward`, before the compressor)::

    pixels (B,3,H,W) -> features x (B,N,D) -> x + sigma * n_b -> compressor client half -> wire

``n_b ~ N(0, I)`` is drawn from a generator seeded by the run seed and a hash of
image ``b``'s pixels. So the noise is deterministic (the recompute before the
backward pass sees bitwise the features that were sent, as ``sim/split_step.py``
requires), and the same image gets the same noise every time it is encoded: a
server that sees one image in several rounds cannot average the noise away. An
attacker who knows the seed still needs the image itself to rebuild the noise.
``sigma`` is absolute, in the units of the features at the split point.
"""

from __future__ import annotations

import hashlib

import torch


def image_noise_seed(image: torch.Tensor, seed: int) -> int:
    """A 63-bit generator seed from the run seed and the bytes of one image."""
    h = hashlib.blake2b(image.detach().contiguous().cpu().numpy().tobytes(), digest_size=8, key=str(int(seed)).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def add_feature_noise(x: torch.Tensor, pixels: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``x + sigma * n`` with one seeded standard-normal draw ``n`` of shape ``x[b]`` per image ``b``.

    ``x`` is ``(B, ...)`` features of ``pixels`` ``(B, 3, H, W)``; gradients flow to ``x``."""
    if sigma < 0:
        raise ValueError(f"feature-noise sigma must be >= 0, got {sigma}")
    if x.shape[0] != pixels.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows for {pixels.shape[0]} images")
    if sigma == 0:
        return x
    noise = torch.stack([
        torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(image_noise_seed(img, seed)), dtype=torch.float32)
        for img in pixels
    ])
    return x + sigma * noise.to(device=x.device, dtype=x.dtype)
