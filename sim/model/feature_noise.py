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

With ``feature-noise-clip=C > 0`` the release is the Gaussian mechanism instead
(Dwork & Roth, *The Algorithmic Foundations of Differential Privacy*, Thm. A.1)::

    x (B,N,D) -> x_b * min(1, C / ||x_b||_2) per image b -> + sigma * n_{b,t} -> compressor

``n_{b,t}`` is seeded by the run seed, the image and the release tag ``t`` of the
micro-batch (:class:`FeatureRelease`, set by ``sim/training/client.py``): the recompute
of a micro-batch before its backward pass has the same tag, so it sees the noise that
was sent, while every other round, step or evaluation draws afresh. The accounting of
these releases is :mod:`sim.training.feature_dp` (docs/privacy.md). ``C = 0`` keeps the
noise above bitwise.

"The run seed" above is ``ClientModel.noise_seed``: ``cfg.seed``, which the server holds,
unless the SuperNode's node config sets ``noise-secret`` (:mod:`sim.training.node`); then it
is :func:`secret_noise_seed` of the two, which a server without the secret cannot rebuild.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def image_noise_seed(image: torch.Tensor, seed: int) -> int:
    """A 63-bit generator seed from the run seed and the bytes of one image."""
    h = hashlib.blake2b(image.detach().contiguous().cpu().numpy().tobytes(), digest_size=8, key=str(int(seed)).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def secret_noise_seed(seed: int, secret: str) -> int:
    """A 63-bit noise seed from the run seed, keyed by a client-held secret (node config
    ``noise-secret``): without the secret it cannot be rebuilt from the run seed."""
    if not secret:
        raise ValueError("the noise secret is empty")
    key = hashlib.blake2b(secret.encode(), digest_size=64, person=b"noise-secret").digest()  # any length -> a key
    h = hashlib.blake2b(str(int(seed)).encode(), digest_size=8, key=key, person=b"noise-seed")
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass(frozen=True)
class FeatureRelease:
    """How one micro-batch's features are released: ``tag`` names the release (the same
    for a micro-batch and its recompute, different for every other one), ``clip`` is the
    per-image L2 bound C (0 = off: the per-image noise above, the tag unused)."""

    tag: str
    clip: float = 0.0


def release_noise_seed(image: torch.Tensor, seed: int, tag: str) -> int:
    """A 63-bit generator seed from the run seed, the release tag and the bytes of one image."""
    h = hashlib.blake2b(digest_size=8, key=str(int(seed)).encode(), person=b"feature-dp")
    h.update(tag.encode() + b"\0")
    h.update(image.detach().contiguous().cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def clip_per_sample(x: torch.Tensor, clip: float) -> torch.Tensor:
    """``x[b] * min(1, clip / ||x[b]||_2)`` for each row ``b`` of ``x`` (B, ...): every
    row's L2 norm (over all its values) at most ``clip``; rows within it are unchanged."""
    if clip <= 0:
        raise ValueError(f"feature-noise-clip must be > 0 to clip, got {clip}")
    norms = torch.linalg.vector_norm(x.flatten(1), dim=1)
    scale = clip / torch.clamp(norms, min=clip)  # exactly 1 within the bound (a zero row included)
    return x * scale.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _standard_normal(shape: torch.Size, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def add_feature_noise(
    x: torch.Tensor, pixels: torch.Tensor, sigma: float, seed: int, release: FeatureRelease | None = None,
) -> torch.Tensor:
    """``x + sigma * n`` with one seeded standard-normal draw ``n`` of shape ``x[b]`` per image ``b``.

    ``x`` is ``(B, ...)`` features of ``pixels`` ``(B, 3, H, W)``; gradients flow to ``x``.
    With ``release.clip > 0`` each ``x[b]`` is clipped to that L2 norm first and the
    draw is seeded by ``release.tag`` too (fresh per release)."""
    if sigma < 0:
        raise ValueError(f"feature-noise sigma must be >= 0, got {sigma}")
    if x.shape[0] != pixels.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows for {pixels.shape[0]} images")
    clip = release.clip if release is not None else 0.0
    if clip < 0:
        raise ValueError(f"feature-noise-clip must be >= 0, got {clip}")
    if clip > 0:
        x = clip_per_sample(x, clip)
    if sigma == 0:
        return x
    seeds = ([release_noise_seed(img, seed, release.tag) for img in pixels] if clip > 0
             else [image_noise_seed(img, seed) for img in pixels])
    noise = torch.stack([_standard_normal(x.shape[1:], s) for s in seeds])
    return x + sigma * noise.to(device=x.device, dtype=x.dtype)
