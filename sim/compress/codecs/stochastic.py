"""``stochastic``: unbiased stochastic-rounding uniform quantisation of the downlink gradient.

Each group of gradient values (a *token*: one row of ``D`` values; or a *channel*: one
feature dimension of one sample, ``N`` values; ``stochastic-scale``) gets its own
``K = 2^b``-level uniform grid spanning the group's range::

    lo = min (fp16, rounded down)      span = max - lo (fp16, rounded up)
    step = span / (K - 1)              t = (g - lo) / step in [0, K - 1]
    I = floor(t) + [u < t - floor(t)]  with u ~ U[0, 1)        g_hat = lo + I * step

Rounding up with probability equal to the fractional part makes ``g_hat`` an unbiased
estimate of ``g`` (``E[g_hat] = g``) with variance ``frac·(1 - frac)·step^2 <= step^2/4``
per value: the stochastic rounding of QSGD (Alistarh et al., "QSGD: Communication-Efficient
SGD via Gradient Quantization and Encoding", arXiv 1610.02132) and of Gupta et al., "Deep
Learning with Limited Numerical Precision" (arXiv 1502.02551), here on a per-group
min/max grid. An unbiased gradient keeps SGD's expected update; what it costs is
variance, which at b = 1 exceeds the gradient's own energy (a biased codec such as
``topk`` or ``nf`` errs the other way).

Groups, for a gradient of shape ``(S, N, D)`` (``S`` samples' ``N x D`` matrices, how the
wire layer hands over the image and residual streams) or ``(T, D)`` (rows of unequal
samples, the text stream):

* ``token``: every row of ``D`` values (``S·N`` or ``T`` groups);
* ``channel``: every feature dimension of every sample (``S·D`` groups of ``N``), or of
  the whole message for a 2-D gradient (``D`` groups of ``T``).

Wire format: ``codes.index`` the b-bit indices packed little-endian, group by group
(``ceil(n·b/8)`` bytes; integer codes, so ``grad-entropy-coding`` applies), ``side.lo``
and ``side.span`` one fp16 each per group. The rounding noise comes from a CPU
``torch.Generator`` seeded with ``content_seed(seed, g)``: deterministic given the run's
seed and the gradient, fresh for every message. Gradients are clamped to ``±32752`` so
a group's range fits fp16.

Data flow: ``g -> groups (G, n) -> lo, span (fp16) -> stochastic rounding on the
group's 2^b-level grid -> I (b bits) + lo, span -> lo + I * span / (K - 1) -> g_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sim.settings import option

from ..base import (
    Codec, IndexLayout, Layout, PayloadError, WireArray, check_layout, content_seed, fp16_directed, numel,
    require_finite,
)
from ..packing import pack_bits, packed_nbytes, unpack_codes

SCALES = ("token", "channel")
CLAMP = 32752.0  # half the fp16 range, so a group's span (max - min) fits fp16
_TINY = 1e-30


@dataclass(frozen=True)
class StochasticSettings:
    scale: str = option("token", "groups of the `stochastic` gradient codec's scales: `token` (one fp16 min and range per "
                        "row of D values) or `channel` (per feature dimension of each sample)", choices=SCALES)


def groups_of(shape: tuple[int, ...], scale: str) -> tuple[int, int]:
    """``(groups, values per group)`` of a gradient of ``shape`` (see the module docstring)."""
    if len(shape) < 1 or any(int(s) < 0 for s in shape):
        raise PayloadError(f"bad gradient shape {tuple(shape)}")
    n, dim = numel(shape), int(shape[-1])
    if scale == "token" or dim == 0:
        return (n // dim if dim else 0), dim
    if len(shape) >= 3:
        samples, rows = math.prod(shape[:-2]), int(shape[-2])
        return samples * dim, rows
    return dim, n // dim


def to_groups(g: torch.Tensor, scale: str) -> torch.Tensor:
    """``g`` as ``(groups, values)`` rows in wire order."""
    shape = tuple(g.shape)
    groups, per = groups_of(shape, scale)
    if scale == "token":
        return g.reshape(groups, per)
    dim = shape[-1]
    if len(shape) >= 3:
        return g.reshape(-1, shape[-2], dim).transpose(1, 2).reshape(groups, per)
    return g.reshape(-1, dim).t().reshape(groups, per)


def from_groups(x: torch.Tensor, shape: tuple[int, ...], scale: str) -> torch.Tensor:
    """Inverse of :func:`to_groups`."""
    if scale == "token":
        return x.reshape(shape)
    dim = shape[-1]
    if len(shape) >= 3:
        return x.reshape(-1, dim, shape[-2]).transpose(1, 2).reshape(shape)
    return x.reshape(dim, -1).t().reshape(shape)


def reconstruct(index: torch.Tensor, lo16: torch.Tensor, span16: torch.Tensor, levels: int) -> torch.Tensor:
    """``lo + I * span / (K - 1)`` per group, from the fp16 side values (both ends)."""
    step = (span16.float() / (levels - 1))[:, None]
    return lo16.float()[:, None] + index.to(torch.float32) * step + 0.0  # + 0.0: -0.0 -> +0.0


def stochastic_round(x: torch.Tensor, bits: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, lo16, span16)`` of groups ``x (G, n)``: unbiased rounding on each group's grid."""
    levels = 2**bits
    lo16 = fp16_directed(x.amin(1), up=False) if x.numel() else x.new_zeros(x.shape[0]).half()
    span16 = fp16_directed(x.amax(1) - lo16.float(), up=True) if x.numel() else x.new_zeros(x.shape[0]).half()
    step = (span16.float() / (levels - 1)).clamp_min(_TINY)[:, None]
    t = ((x - lo16.float()[:, None]) / step).clamp(0, levels - 1)
    low = torch.floor(t)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    index = (low + (u < t - low).float()).clamp(0, levels - 1).to(torch.int64)
    return index, lo16, span16


class Stochastic(Codec):
    """Unbiased stochastic rounding on per-token or per-channel uniform grids (gradient only)."""

    name = "stochastic"
    summary = "unbiased stochastic rounding to a 2^b-level uniform grid per token or per channel (fp16 min and range)"
    streams = frozenset({"gradient"})
    bit_range = (1, 8)
    gradient_integer_codes = True
    unbiased = True
    Settings = StochasticSettings

    def gradient_layout(self, shape: tuple[int, ...]) -> Layout:
        groups, _ = groups_of(shape, self.settings.scale)
        return {"codes.index": WireArray("uint8", packed_nbytes(numel(shape), self.bits)),
                "side.lo": WireArray("float16", groups), "side.span": WireArray("float16", groups)}

    def gradient_index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return numel(shape), self.bits, 2**self.bits

    def encode_gradient(self, g: torch.Tensor) -> dict[str, np.ndarray]:
        g = g.detach().float().cpu()
        if not torch.isfinite(g).all():
            raise ValueError("stochastic: the gradient to encode contains NaN or inf")
        x = to_groups(g.clamp(-CLAMP, CLAMP), self.settings.scale)
        gen = torch.Generator().manual_seed(content_seed(self.seed, g))
        index, lo16, span16 = stochastic_round(x, self.bits, gen)
        return {"codes.index": pack_bits(index.numpy(), self.bits), "side.lo": lo16.numpy(), "side.span": span16.numpy()}

    def decode_gradient(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        arrays = check_layout(arrays, self.gradient_layout(shape), self.name)
        lo, span = arrays["side.lo"], arrays["side.span"]
        require_finite("lo", lo)
        require_finite("span", span)
        if (span < 0).any():
            raise PayloadError("payload array 'span' has a negative group range")
        groups, per = groups_of(shape, self.settings.scale)
        index = torch.from_numpy(unpack_codes(arrays["codes.index"], self.bits, numel(shape))).reshape(groups, per)
        x = reconstruct(index, torch.from_numpy(lo.copy()), torch.from_numpy(span.copy()), 2**self.bits)
        if not torch.isfinite(x).all():
            raise PayloadError("the group ranges overflow float32")
        return from_groups(x, shape, self.settings.scale)


CODEC = Stochastic
