"""``lowrank``: a rank-r factorisation of each sample's gradient, PowerSGD-style.

PowerSGD (Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", arXiv 1905.13727) compresses a gradient matrix
``M`` by one step of subspace (power) iteration from a previous or random ``Q``::

    P = M Q,   P <- orthonormal basis of P (QR),   Q = M^T P,   M_hat = P Q^T

``M_hat = P P^T M`` is the projection of ``M`` onto an r-dimensional subspace of its
columns, so ``||M - M_hat|| <= ||M||``; it is exact when ``M`` has rank <= r, and more
iterations (``lowrank-iters``) bring it towards the best rank-r approximation (the SVD's,
Eckart-Young). PowerSGD warm-starts ``Q`` from the previous step and relies on error
feedback; here the codec is stateless, so ``Q`` starts from a Gaussian drawn from
``content_seed(seed, g)`` (deterministic given the run's seed and the gradient) and error
feedback is the separate ``grad-error-feedback`` option (docs/compressors.md).

What is factorised: for a gradient of shape ``(S, N, D)`` each sample's ``N x D`` matrix
(how the wire layer hands over the image and residual streams, ``N`` tokens of width
``D``); for ``(T, D)`` (the text stream's rows of unequal samples) the one ``T x D``
matrix. The rank used is ``r = min(lowrank-rank, N, D)``.

Wire format per matrix: ``codes.p`` (``N·r`` values) and ``codes.q`` (``D·r``) in
``lowrank-dtype`` (fp16 or fp32): ``(N + D)·r`` values, 2 or 4 bytes each. To keep fp16
factors clear of underflow, each column pair is balanced: ``p_i`` and ``q_i`` carry
``sqrt(||q_i||)`` each (the product is unchanged); fp16 values saturate at +-65504.

Data flow: ``g (S, N, D) -> Q0 (D, r) seeded -> [P = M Q, QR, Q = M^T P] x iters ->
balance -> codes.p, codes.q -> P Q^T -> g_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sim.settings import option

from ..base import Codec, Layout, PayloadError, WireArray, check_layout, content_seed, require_finite

DTYPES = {"fp16": ("float16", torch.float16), "fp32": ("float32", torch.float32)}
FP16_MAX = 65504.0


@dataclass(frozen=True)
class LowRankSettings:
    rank: int = option(4, "rank r of the `lowrank` gradient codec per sample (r = min(rank, N, D))", lo=1, hi=4096)
    iters: int = option(1, "power iterations of the `lowrank` gradient codec (PowerSGD: 1, warm-started; more "
                        "approach the best rank-r approximation)", lo=1, hi=16)
    dtype: str = option("fp16", "wire dtype of the `lowrank` gradient factors", choices=tuple(DTYPES))


def matrices_of(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(matrices, rows, cols)`` of a gradient of ``shape``: the leading dims count the
    matrices of a 3-D (or higher) shape; a 2-D shape is one matrix, a 1-D one a row."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise PayloadError(f"bad gradient shape {shape}")
    if len(shape) >= 3:
        return math.prod(shape[:-2]), shape[-2], shape[-1]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    return 1, 1, shape[0]


def orthonormal(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of each matrix of ``x (M, n, r)`` (reduced QR)."""
    return torch.linalg.qr(x, mode="reduced").Q


class LowRank(Codec):
    """Rank-r factors of each sample's gradient matrix (gradient only)."""

    name = "lowrank"
    summary = "rank-r factors P (N x r), Q (D x r) of each sample's gradient by power iteration (PowerSGD), fp16/fp32"
    streams = frozenset({"gradient"})
    bit_unit = None  # the size is set by lowrank-rank and lowrank-dtype, not by grad-bits
    Settings = LowRankSettings

    def rank_for(self, rows: int, cols: int) -> int:
        return max(0, min(self.settings.rank, rows, cols))

    def gradient_layout(self, shape: tuple[int, ...]) -> Layout:
        m, rows, cols = matrices_of(shape)
        r, dt = self.rank_for(rows, cols), DTYPES[self.settings.dtype][0]
        return {"codes.p": WireArray(dt, m * rows * r), "codes.q": WireArray(dt, m * cols * r)}

    def factors(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced float32 factors ``P (M, N, r)``, ``Q (M, D, r)`` with ``P Q^T`` ~ each matrix of ``g``."""
        g = g.detach().float().cpu()
        if not torch.isfinite(g).all():
            raise ValueError("lowrank: the gradient to encode contains NaN or inf")
        m, rows, cols = matrices_of(tuple(g.shape))
        x = g.reshape(m, rows, cols)
        r = self.rank_for(rows, cols)
        if r == 0 or m == 0:
            return x.new_zeros(m, rows, r), x.new_zeros(m, cols, r)
        gen = torch.Generator().manual_seed(content_seed(self.seed, g))
        q = torch.randn(cols, r, generator=gen).expand(m, cols, r)
        for i in range(self.settings.iters):
            if i:
                q = orthonormal(q)
            p = orthonormal(x @ q)
            q = x.transpose(1, 2) @ p
        norm = q.norm(dim=1, keepdim=True)  # (M, 1, r) = ||q_i||
        root = norm.sqrt()
        p = p * root
        q = torch.where(norm > 0, q / root.clamp_min(1e-30), torch.zeros_like(q))
        return p, q

    def encode_gradient(self, g: torch.Tensor) -> dict[str, np.ndarray]:
        p, q = self.factors(g)
        dt = DTYPES[self.settings.dtype][1]
        if dt == torch.float16:
            p, q = p.clamp(-FP16_MAX, FP16_MAX), q.clamp(-FP16_MAX, FP16_MAX)
        return {"codes.p": p.to(dt).contiguous().numpy().reshape(-1), "codes.q": q.to(dt).contiguous().numpy().reshape(-1)}

    def decode_gradient(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        arrays = check_layout(arrays, self.gradient_layout(shape), self.name)
        for name in ("p", "q"):
            require_finite(name, arrays[f"codes.{name}"])
        m, rows, cols = matrices_of(shape)
        r = self.rank_for(rows, cols)
        p = torch.from_numpy(arrays["codes.p"].astype(np.float32)).reshape(m, rows, r)
        q = torch.from_numpy(arrays["codes.q"].astype(np.float32)).reshape(m, cols, r)
        out = p @ q.transpose(1, 2) + 0.0
        if not torch.isfinite(out).all():
            raise PayloadError("the low-rank factors' product overflows float32")
        return out.reshape(shape)


CODEC = LowRank
