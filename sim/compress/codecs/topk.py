"""Randomized top-k sparsification (Zheng et al. 2023), the sparsification baseline of Quantized-TinyLLaVA.

Per token (row of ``D`` features) keep the ``k = round(b/16 * D)`` largest-magnitude
values plus ``r`` extra positions drawn uniformly without replacement from the
``D - k`` others (the paper's public code uses ``r = round(0.1 * D)``), so that
non-top-k features keep a chance of reaching the server. Quantized-TinyLLaVA
(arXiv 2511.23402), Table 1, gives
the compression rate ``H / K`` (our :meth:`TopKClient.nominal_ratio`, ``D / k``),
which ignores the random share and the cost of the positions; the true ratio
(fp16 dense bytes / payload bytes) is :meth:`TopKClient.true_ratio`.

Wire format for ``T`` tokens and ``m = k + r`` kept values per token:

* ``codes.values``: ``T*m`` fp16 values, each token's positions in ascending order
  (values saturate at +-65504; NaN stays NaN and is rejected by the server);
* ``side.positions``: a bitmask (``T*D`` bits, packed) or an index list
  (``ceil(log2 D)`` bits per index, packed), whichever is fewer bytes for the batch;
* ``side.format``: one uint8, 0 = bitmask, 1 = index list.

Randomness: the extra positions come from a CPU ``torch.Generator`` seeded with
``seed * 1_000_003 + call`` where ``call`` counts this client's forward passes, so a
run is reproducible and independent of the global RNG.

Gradient: ``y`` is the scatter of the kept (fp16-rounded) values into zeros, and its
straight-through gradient is the gradient of that scatter: the upstream gradient at
kept positions, zero elsewhere.

Data flow: ``x (B,N,D) -> top-k |x| + r random positions -> fp16 values + positions
(mask or index list) -> dense y (zeros elsewhere)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sim.settings import option

from ..base import (
    ClientCodec, Codec, Encoded, Layout, Payload, PayloadError, ServerCodec, WireArray, check_layout,
    require_finite, rows_of,
)
from ..packing import pack_bits, packed_nbytes, unpack_codes

FP16_MAX = 65504.0
FORMAT_MASK, FORMAT_INDEX = 0, 1


def keep_counts(dim: int, bits: int, random_share: float = 0.1) -> tuple[int, int]:
    """``(k, r)``: top-k count ``round(b/16 * D)`` and random extras ``round(share * D)``."""
    if dim < 2:
        raise ValueError(f"topk needs a feature dim >= 2, got {dim}")
    if not 1 <= bits <= 16:
        raise ValueError(f"topk bits must be in 1..16, got {bits}")
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"topk random share must be in [0, 1], got {random_share}")
    k = round(bits / 16 * dim)
    if k < 1:
        raise ValueError(f"topk: round({bits}/16 * {dim}) = 0 values kept; use more bits or a wider dim")
    return k, min(round(random_share * dim), dim - k)


def index_bits(dim: int) -> int:
    return max(1, math.ceil(math.log2(dim)))


def positions_nbytes(rows: int, dim: int, m: int) -> tuple[int, int]:
    """``(format, bytes)`` of the cheaper position encoding (ties go to the bitmask)."""
    mask, index = packed_nbytes(rows * dim, 1), packed_nbytes(rows * m, index_bits(dim))
    return (FORMAT_MASK, mask) if mask <= index else (FORMAT_INDEX, index)


def payload_nbytes(rows: int, dim: int, m: int) -> int:
    """Exact bytes: fp16 values + cheaper positions + 1 format byte."""
    return 2 * rows * m + positions_nbytes(rows, dim, m)[1] + 1


def largest(v: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices ``(T, k)`` of the ``k`` largest entries per row, unordered
    (``np.argpartition`` on CPU, ~2.5x faster than ``torch.topk`` there)."""
    if v.device.type != "cpu":
        return torch.topk(v, k, dim=-1, sorted=False).indices
    d = v.shape[-1]
    part = np.argpartition(v.numpy(), d - k, axis=-1)[:, d - k :]
    return torch.from_numpy(np.ascontiguousarray(part, dtype=np.int64))


def select_positions(x2: torch.Tensor, k: int, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted kept positions ``(T, k + r)``: top-k of ``|x|`` plus ``r`` uniform others."""
    top = largest(x2.detach().abs(), k)
    if r == 0:
        return torch.sort(top, dim=-1).values
    if generator is None:
        raise ValueError("topk: a generator is needed for r > 0 random positions")
    scores = torch.rand(x2.shape, generator=generator, device="cpu").to(x2.device)
    scores.scatter_(1, top, -1.0)  # exclude the top-k; uniform among the rest
    extra = largest(scores, r)
    return torch.sort(torch.cat([top, extra], dim=-1), dim=-1).values


def to_fp16(v: torch.Tensor) -> torch.Tensor:
    """Saturating cast to fp16 (NaN stays NaN)."""
    return v.detach().clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def densify(positions: torch.Tensor, values16: torch.Tensor, dim: int) -> torch.Tensor:
    """Scatter fp16 values into zeros ``(T, dim)`` float32; identical on both ends."""
    out = torch.zeros(positions.shape[0], dim, dtype=torch.float32, device=positions.device)
    return out.scatter_(1, positions, values16.float()) + 0.0  # + 0.0: -0.0 -> +0.0, so y is bitwise stable


def pack_sparse(positions: torch.Tensor, values16: torch.Tensor, dim: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(codes, side)`` arrays for sorted ``positions (T, m)`` and fp16 ``values (T, m)``."""
    rows, m = positions.shape
    fmt, _ = positions_nbytes(rows, dim, m)
    pos = positions.detach().cpu()
    if fmt == FORMAT_MASK:
        mask = torch.zeros(rows, dim, dtype=torch.uint8).scatter_(1, pos, 1)
        packed = pack_bits(mask.numpy(), 1)
    else:
        packed = pack_bits(pos.numpy(), index_bits(dim))
    codes = {"values": values16.detach().cpu().numpy().reshape(-1)}
    return codes, {"positions": packed, "format": np.array([fmt], dtype=np.uint8)}


def sparse_layout(rows: int, dim: int, m: int) -> Layout:
    """fp16 values, the cheaper position encoding for the shape, one format byte."""
    return {"codes.values": WireArray("float16", rows * m), "side.positions": WireArray("uint8", positions_nbytes(rows, dim, m)[1]),
            "side.format": WireArray("uint8", 1)}


def unpack_sparse(arrays: dict[str, np.ndarray], rows: int, dim: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and return ``(positions (rows, m) int64, values (rows, m) fp16)``."""
    check_layout(arrays, sparse_layout(rows, dim, m), "topk")
    values, buf = arrays["codes.values"], arrays["side.positions"]
    require_finite("values", values)
    fmt = int(arrays["side.format"][0])
    if fmt != positions_nbytes(rows, dim, m)[0]:
        raise PayloadError(f"topk position format {fmt} is not the one this shape uses")
    if fmt == FORMAT_MASK:
        mask = unpack_codes(buf, 1, rows * dim).reshape(rows, dim)
        if rows and (mask.sum(1) != m).any():
            raise PayloadError(f"topk bitmask rows must each have exactly {m} set bits")
        pos = np.nonzero(mask)[1].reshape(rows, m)
    else:
        pos = unpack_codes(buf, index_bits(dim), rows * m).reshape(rows, m)
        if pos.size and pos.max() >= dim:
            raise PayloadError(f"topk position {pos.max()} out of range for dim {dim}")
        if m > 1 and (np.diff(pos, axis=1) <= 0).any():
            raise PayloadError("topk positions must be strictly increasing within each token")
    return torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)), torch.from_numpy(values.copy()).reshape(rows, m)


def _ideal_bits(rows: int, dim: int, m: int) -> float:
    """16 bits per value plus ``log2 C(D, m)`` bits per token for the positions."""
    log2_binom = (math.lgamma(dim + 1) - math.lgamma(m + 1) - math.lgamma(dim - m + 1)) / math.log(2)
    return float(rows * (16 * m + log2_binom))


@dataclass(frozen=True)
class TopKSettings:
    random: float = option(0.1, "share of extra random positions per token for `topk` (the paper's code: 0.1)", lo=0.0, hi=1.0)


class TopKClient(ClientCodec):
    """Client half: per-token randomized top-k, fp16 values, cheapest position encoding."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        self.seed = spec.seed
        self.k, self.r = keep_counts(self.dim, self.bits, spec.settings.random)
        self.m = self.k + self.r

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        self.check_input(x)
        # The random share is a function of the seed and the input bits, so recomputing the
        # same forward (as the client does before its backward) selects the same positions.
        content = int(x.detach().contiguous().view(torch.int32).to(torch.int64).sum())
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + content) % (2**63 - 1))
        x2 = x.reshape(-1, self.dim)
        pos = select_positions(x2, self.k, self.r, gen)
        vals16 = to_fp16(torch.gather(x2, 1, pos))
        dense = densify(pos, vals16, self.dim)
        mask = torch.zeros_like(x2).scatter_(1, pos, 1.0)
        y = (dense + mask * (x2 - x2.detach())).reshape(x.shape)  # value exactly; grad = mask
        return Encoded(y=y, codes=vals16, aux_loss=x.new_zeros(()), side={"positions": pos})

    def pack(self, enc: Encoded) -> Payload:
        pos = enc.side["positions"]
        codes, side = pack_sparse(pos, enc.codes, self.dim)
        return Payload(codes=codes, side=side, ideal_bits=_ideal_bits(pos.shape[0], self.dim, self.m))

    def nominal_ratio(self) -> float:
        """Quantized-TinyLLaVA Table 1: ``H / K`` with ``K = k`` top-k values (ignores extras and positions)."""
        return self.dim / self.k

    def true_ratio(self, payload: Payload) -> float:
        """fp16 dense bytes / payload bytes, for the tokens in ``payload``."""
        rows = payload.codes["values"].size // self.m
        return 2 * rows * self.dim / payload.nbytes


class TopKServer(ServerCodec):
    """Server half: validate positions/values, scatter into zeros; identity forward."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        k, r = keep_counts(self.dim, self.bits, spec.settings.random)
        self.m = k + r

    def decode(self, arrays: dict[str, np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:
        pos, vals16 = unpack_sparse(arrays, rows_of(shape), self.dim, self.m)
        return densify(pos, vals16, self.dim).reshape(shape)


class TopK(Codec):
    """Randomized top-k on features; on the downlink gradient (``grad-compressor=topk``) the
    plain top-k of each row (no random share)."""

    name = "topk"
    summary = "randomized top-k: the largest round(b/16*D) values per token plus a random share, fp16, positions"
    streams = frozenset({"image", "residual", "text", "gradient"})
    bit_range = (1, 16)
    Settings = TopKSettings
    Client, Server = TopKClient, TopKServer

    @classmethod
    def check(cls, settings: TopKSettings, bits: int, dim: int) -> None:
        if dim:
            keep_counts(dim, bits, settings.random)

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return sparse_layout(rows_of(shape), shape[-1], sum(keep_counts(shape[-1], self.bits, self.settings.random)))

    # ---- the gradient stream -----------------------------------------------------------
    def gradient_layout(self, shape: tuple[int, ...]) -> Layout:
        return sparse_layout(rows_of(shape), shape[-1], keep_counts(shape[-1], self.bits, 0.0)[0])

    def encode_gradient(self, g: torch.Tensor) -> dict[str, np.ndarray]:
        rows, dim = rows_of(tuple(g.shape)), int(g.shape[-1])
        g2 = g.detach().reshape(rows, dim).float()
        pos = select_positions(g2, keep_counts(dim, self.bits, 0.0)[0], 0)
        codes, side = pack_sparse(pos, to_fp16(torch.gather(g2, 1, pos)), dim)
        return Payload(codes=codes, side=side).arrays()

    def decode_gradient(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        rows, dim = rows_of(shape), int(shape[-1])
        pos, vals = unpack_sparse(arrays, rows, dim, keep_counts(dim, self.bits, 0.0)[0])
        return torch.zeros(rows, dim, dtype=torch.float32).scatter_(1, pos, vals.float()).reshape(shape)


CODEC = TopK
