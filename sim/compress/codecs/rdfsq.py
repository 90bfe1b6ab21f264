"""RD-FSQ: the rate-distortion finite scalar quantiser of Quantized-TinyLLaVA.

Quantized-TinyLLaVA (arXiv 2511.23402), section 3.1 and Algorithm 2:

1. a learned linear layer ``E_phi`` on the client;
2. clip to ``[mu - 3 sigma, mu + 3 sigma]`` and scale linearly to ``e in [-1, 1]``;
3. with ``K = 2^b`` levels and ``h = (K-1)/2``: ``z = round(h e)`` for odd K,
   ``z = round(h e - 0.5) + 0.5`` for even K; the index ``I = z + h`` crosses the
   wire, packed at b bits per value;
4. the server rebuilds ``C = (I - h) / h`` on the symmetric K-level grid and a
   learned linear layer maps it to the LLM's space;
5. commitment (distortion) loss ``alpha * (1 - cos(h e, sg(z)))`` per token, added
   on the client; gradients pass the rounding straight through.

Options (run-config keys ``rdfsq-stats``, ``rdfsq-send-range``, ``rdfsq-clip``, ``rdfsq-range``, ``rdfsq-alpha``):

* ``stats`` — where ``mu`` and ``sigma`` come from:

  - ``global``: batch-global scalars over the micro-batch (the paper's public code);
  - ``per-dim`` (default): one mean/std per feature dimension over the micro-batch's
    tokens;
  - ``ema``: per-dimension running statistics. The clip uses the buffers ``mean``/
    ``var``, which change only once per round: every optimiser step's recompute adds
    its batch statistics to the EMA buffers ``ema_mean``/``ema_var`` (decay
    ``ema-decay``); the round engine FedAvgs all five buffers and :meth:`RDFSQ.fold_synced`
    copies the EMA into ``mean``/``var`` (the same schedule as AlignedVQ's codebook,
    so an encode and its recompute always clip identically). Before round 1 they are
    initialised from one client's features (:meth:`RDFSQClient.init_from`).

* ``send_range`` — whether the clip range travels. Off (as the paper's public code, and the
  from-scratch regime's setting): the server sees ``C`` in [-1, 1] and its projection absorbs
  the scale; the payload is exactly ``ceil(B*N*D*b/8)`` bytes. On (default, so that a codec
  inserted into a pretrained model starts as the identity up to quantisation,
  docs/foundation.md): the centre ``mu`` and half-width ``3 sigma``
  go as fp16 side arrays ``side.mu``/``side.half`` (1 value each for ``global``, D
  otherwise, per micro-batch; the half-width rounded up) and the server rebuilds
  ``C * half + mu`` in the feature's own units; the client clips with the same fp16
  values so both ends agree bitwise.

* ``range`` — the interval the grid spans:

  - ``sigma`` (default): ``[mu - clip sigma, mu + clip sigma]`` itself;
  - ``minmax``: Algorithm 2's ``scale(x) = 2 (X - min X) / (max X - min X) - 1`` as the paper
    writes it, applied after the clip: the clipped values' own minimum and maximum (per
    dimension, or of the batch for ``global``), so that a dimension whose values stay inside
    ``mu +- clip sigma`` uses all of the grid. The bounds travel in ``side.mu``/``side.half``
    as the centre and half-width of that interval; the payload is unchanged.

* ``alpha`` — the commitment weight. The paper's public code uses 0.25; the default here is 0
  because on the synthetic benchmark alpha = 0.25 lowered accuracy (docs/compressors.md).

Data flow: ``x (B,N,D) -> Linear -> clip/scale (stats) -> round on K-grid -> I (b bits)
[+ mu, half fp16] -> C [* half + mu] -> Linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sim.settings import option

from ..base import (
    ClientCodec, Codec, Encoded, IndexLayout, Layout, Payload, PayloadError, ServerCodec, WireArray,
    ema_decay_option, numel, require_finite, straight_through,
)
from ..packing import pack_bits, packed_nbytes, unpack_codes

STATS = ("global", "per-dim", "ema")
RANGES = ("sigma", "minmax")
EMA_BUFFERS = ("mean", "var", "ema_mean", "ema_var", "initted")  # relative to the codec
_MIN_HALF = 1e-6


@dataclass(frozen=True)
class RDFSQSettings:
    stats: str = option("per-dim", "RD-FSQ clip statistics: per feature dimension over the micro-batch, batch scalars "
                        "(`global`, the paper's code; learns much worse at 2 bits here, docs/results-spine.md) or "
                        "running per-dimension statistics updated once per round (`ema`)", choices=STATS)
    alpha: float = option(0.0, "weight of the RD-FSQ cosine commitment loss (the paper's code uses 0.25; it lowered "
                          "accuracy here, docs/results-spine.md)", lo=0.0, hi=100.0)
    send_range: bool = option(True, "send the RD-FSQ clip range (fp16 centre and half-width, counted as side "
                              "information) so the server rebuilds features in their own units (a codec inserted "
                              "into the pretrained model then starts as the identity up to quantisation); off: the "
                              "server projection absorbs the scale (the paper's code)")
    clip: float = option(3.0, "RD-FSQ clip range in standard deviations either side of the mean (the paper: 3); "
                         "the 2^b grid points span it; 1.5 and 2 were no better at b = 2 on the default job "
                         "(docs/results-foundation.md)", lo=0.1, hi=100.0)
    range: str = option("sigma", "interval the RD-FSQ grid spans: mean +- clip std (`sigma`), or the clipped values' "
                        "own min and max, Algorithm 2's scale() as written (`minmax`; docs/results-foundation.md)",
                        choices=RANGES)
    ema_decay: float = ema_decay_option()


def batch_stats(z: torch.Tensor, stats: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, sigma)`` of ``z`` (B,N,D): scalars (``global``) or per dimension (``per-dim``)."""
    if stats == "global":
        return z.mean(), z.std()
    if stats == "per-dim":
        flat = z.reshape(-1, z.shape[-1])
        return flat.mean(0), flat.std(0)
    raise ValueError(f"batch statistics must be 'global' or 'per-dim', got {stats!r}")


def extent(z: torch.Tensor, scalar: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of ``z`` (B,N,D): of the whole batch (``scalar``) or per dimension."""
    if scalar:
        return z.min(), z.max()
    flat = z.reshape(-1, z.shape[-1])
    return flat.min(0).values, flat.max(0).values


def scale_into(z: torch.Tensor, mu: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Clip ``z`` to ``[mu - half, mu + half]`` and map that range linearly onto [-1, 1]."""
    return (torch.minimum(torch.maximum(z, mu - half), mu + half) - mu) / half


def clip_and_scale(z: torch.Tensor, stats: str) -> torch.Tensor:
    """Clip ``z`` (B,N,D) to mean +- 3 std of the batch and scale linearly to [-1, 1]."""
    mu, sigma = batch_stats(z, stats)
    return scale_into(z, mu.detach(), (3.0 * sigma.detach()).clamp_min(_MIN_HALF))


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


def range_to_fp16(mu: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip range as sent: fp16 centre (nearest) and half-width rounded up."""
    mu16 = mu.detach().float().clamp(-65504, 65504).to(torch.float16)
    h = half.detach().float().clamp(_MIN_HALF, 65504)
    h16 = h.to(torch.float16)
    h16 = torch.where(h16.float() < h, torch.nextafter(h16, torch.full_like(h16, math.inf)), h16)
    return mu16.reshape(-1), h16.clamp_min(torch.finfo(torch.float16).tiny).reshape(-1)


class RDFSQClient(ClientCodec):
    """Client half: projection, clip/scale, rounding, packing (see the module docstring)."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        s = spec.settings
        self.levels, self.stats, self.alpha, self.send_range, self.decay = 2**self.bits, s.stats, s.alpha, s.send_range, s.ema_decay
        self.clip, self.span = s.clip, s.range
        self.proj = nn.Linear(self.dim, self.dim)
        if self.stats == "ema":
            for name, init in (("mean", 0.0), ("var", 1.0), ("ema_mean", 0.0), ("ema_var", 1.0)):
                self.register_buffer(name, torch.full((self.dim,), init))
            self.register_buffer("initted", torch.tensor(False))

    # ---- statistics ---------------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """EMA statistics from the projected features of ``x`` (B,N,D); once only."""
        if not self.needs_init:
            return
        mu, sigma = batch_stats(self.proj(x), "per-dim")
        for name, v in (("mean", mu), ("ema_mean", mu), ("var", sigma**2), ("ema_var", sigma**2)):
            getattr(self, name).copy_(v)
        self.initted.fill_(True)

    def _range(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centre, half-width)`` of the interval the grid spans for projected features ``z``
        (``range``: the clip range, or the clipped values' own extent); constants for autograd."""
        mu, half = self._clip_range(z)
        if self.span == "sigma":
            return mu, half
        lo, hi = extent(z.detach(), self.stats == "global")
        lo, hi = torch.maximum(lo, mu - half), torch.minimum(hi, mu + half)
        return (lo + hi) / 2, ((hi - lo) / 2).clamp_min(_MIN_HALF)

    def _clip_range(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, clip * sigma)`` for projected features ``z``."""
        if self.stats != "ema":
            mu, sigma = batch_stats(z.detach(), self.stats)
            return mu, (self.clip * sigma).clamp_min(_MIN_HALF)
        if not bool(self.initted):
            raise RuntimeError("rdfsq ema statistics are not initialised: call init_from(features) or load a state")
        if self.training and torch.is_grad_enabled():  # the recompute before an optimiser step
            with torch.no_grad():
                m, s = batch_stats(z.detach(), "per-dim")
                self.ema_mean.mul_(self.decay).add_((1 - self.decay) * m)
                self.ema_var.mul_(self.decay).add_((1 - self.decay) * s**2)
        return self.mean.clone(), (self.clip * self.var.clamp_min(0).sqrt()).clamp_min(_MIN_HALF)

    # ---- codec ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        self.check_input(x)
        z = self.proj(x)
        mu, half = self._range(z)
        side: dict[str, torch.Tensor] = {}
        if self.send_range:
            mu16, half16 = range_to_fp16(mu, half)
            side = {"mu": mu16, "half": half16}
            mu, half = mu16.float().reshape(mu.shape), half16.float().reshape(half.shape)
        e = scale_into(z, mu, half)
        zq, index = round_to_grid(e.detach(), self.levels)
        h = (self.levels - 1) / 2
        if self.alpha:
            aux = self.alpha * (1.0 - F.cosine_similarity(h * e, zq, dim=-1, eps=1e-8)).mean()
        else:  # alpha = 0: the commitment term is exactly zero; skip its cost
            aux = z.new_zeros(())
        c = index_to_value(index, self.levels)
        if self.send_range:
            y = straight_through(c * half + mu, e * half + mu)  # gradient 1 inside the clip range
        else:
            y = straight_through(c, e)
        return Encoded(y=y, codes=index, aux_loss=aux, side=side)

    def pack(self, enc: Encoded) -> Payload:
        codes = enc.codes.numpy()
        side = {k: v.detach().cpu().numpy().reshape(-1) for k, v in enc.side.items()}
        return Payload(codes={"index": pack_bits(codes, self.bits)}, side=side, ideal_bits=codes.size * math.log2(self.levels))


class RDFSQServer(ServerCodec):
    """Server half: unpack, rebuild the grid values (and the range, if sent), learned projection."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        self.levels, self.stats, self.send_range = 2**self.bits, spec.settings.stats, spec.settings.send_range
        self.proj = nn.Linear(self.dim, self.dim)

    def decode(self, arrays: dict[str, np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:
        index = unpack_codes(arrays["codes.index"], self.bits, numel(shape))
        c = index_to_value(torch.from_numpy(index), self.levels).reshape(shape)
        if not self.send_range:
            return c
        mu, half = arrays["side.mu"], arrays["side.half"]
        require_finite("mu", mu)
        require_finite("half", half)
        if (half <= 0).any():
            raise PayloadError("payload array 'half' has a non-positive clip half-width")
        shape_r = () if self.stats == "global" else (self.dim,)
        half_t = torch.from_numpy(half.astype(np.float32)).reshape(shape_r)
        mu_t = torch.from_numpy(mu.astype(np.float32)).reshape(shape_r)
        return c * half_t + mu_t

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return self.proj(y_hat)


class RDFSQ(Codec):
    name = "rdfsq"
    summary = "RD-FSQ (Quantized-TinyLLaVA): 3-sigma clip, symmetric 2^b-level grid, learned projections"
    streams = frozenset({"image", "residual", "text"})
    bit_range = (1, 8)
    integer_codes = True
    Settings = RDFSQSettings
    Client, Server = RDFSQClient, RDFSQServer

    def _range_size(self) -> int:
        return 1 if self.settings.stats == "global" else self.dim

    def layout(self, shape: tuple[int, ...]) -> Layout:
        out = {"codes.index": WireArray("uint8", packed_nbytes(numel(shape), self.bits))}
        if self.settings.send_range:
            out |= {"side.mu": WireArray("float16", self._range_size()), "side.half": WireArray("float16", self._range_size())}
        return out

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return numel(shape), self.bits, 2**self.bits

    @property
    def synced_buffers(self) -> tuple[str, ...]:
        return EMA_BUFFERS if self.settings.stats == "ema" else ()

    @property
    def init_flag(self) -> str | None:
        return "initted" if self.settings.stats == "ema" else None

    def fold_synced(self, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """Next round's clip statistics: the (FedAvg'd) EMA buffers."""
        if prefix + "ema_mean" not in state:
            return state
        out = dict(state)
        out[prefix + "mean"] = state[prefix + "ema_mean"].clone()
        out[prefix + "var"] = state[prefix + "ema_var"].clone()
        return out


CODEC = RDFSQ
