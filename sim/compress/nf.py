"""Blockwise NormalFloat (NF-b) quantisation: paper 000's "b-bit QLoRA" baseline.

Features are cut, per token, into blocks of ``G`` consecutive values (``D % G == 0``);
each block is scaled to [-1, 1] and every value is replaced by the index of the
nearest entry of a ``2^b``-entry NormalFloat codebook (QLoRA, Dettmers et al. 2023,
section 3 "4-bit NormalFloat Quantization"). Two codebooks:

* ``seed`` (the seed code of paper 000): ``q_i = Phi^-1(p_i) / max_j |Phi^-1(p_j)|``
  with ``p_i = (i + 0.5) / 2^b``; symmetric, no zero; each block is min/max-scaled,
  ``e = 2 (x - min) / range - 1``, so the side info is the block minimum and range.
* ``qlora`` (bitsandbytes ``create_normal_map``): asymmetric with an exact zero;
  ``2^(b-1)`` positive levels ``Phi^-1(linspace(o, 1/2, 2^(b-1)+1)[:-1])``,
  ``2^(b-1) - 1`` negative levels ``-Phi^-1(linspace(o, 1/2, 2^(b-1))[:-1])`` and 0,
  all divided by ``Phi^-1(o)`` so the range is exactly [-1, 1]; absmax scaling
  ``e = x / absmax``, side info the block absmax. bitsandbytes hardcodes
  ``o = 0.9677083`` for 4 bits, which is ``1 - (1/(2*15) + 1/(2*16)) / 2``; for other
  b we use the same rule with 15 -> ``2^b - 1`` and 16 -> ``2^b``:
  ``o_b = 1 - (1/(2(2^b - 1)) + 1/2^(b+1)) / 2`` (our generalisation, not a published
  table; b = 4 reproduces the published NF4 values). For b = 1 this gives ``{0, 1}``.

Side info on the wire (all counted in the payload):

* without double quantisation every block scale (range / absmax) is fp16, rounded
  *up*, and every seed block minimum fp16, rounded *down*, so the scaled block always
  lies inside [-1, 1];
* with ``double_quant`` the block scales become uint8 ``ceil(255 s / s_tok)`` with one
  fp32 ``s_tok = max`` per token (QLoRA quantises its absmax constants to 8 bits too,
  with fp8 and blocks of 256; here it is a plain per-token uint8 grid); seed block
  minimums stay fp16.

The client computes ``y`` from the transmitted (quantised) side info with the same
function the server uses, so ``y`` equals the server's reconstruction bitwise; the
gradient is the straight-through identity ``dy/dx = 1``.

Data flow: ``x (B,N,D) -> blocks (T, D/G, G) -> scale to [-1,1] -> nearest NF code
(b bits) + side (fp16 / uint8+fp32) -> codebook[idx] * scale (+ min)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import norm

from .base import ClientCodec, Encoded, IndexLayout, Payload, PayloadError, ServerCodec, require_array, require_finite, straight_through
from .packing import PackError, pack_bits, packed_nbytes, unpack_bits

CODEBOOKS = ("seed", "qlora")
_TINY = 1e-30  # divisor floor for all-zero / constant blocks (their codes are exact anyway)


def seed_codebook(bits: int) -> torch.Tensor:
    """``Phi^-1((i + 0.5)/2^b) / max|Phi^-1|`` for ``i = 0..2^b-1`` (ascending, float32)."""
    q = norm.ppf((np.arange(2**bits) + 0.5) / 2**bits)
    return torch.from_numpy(q / np.abs(q).max()).float()


def qlora_offset(bits: int) -> float:
    """Outermost quantile ``o_b``; ``o_4 = 0.96770833`` is bitsandbytes' 0.9677083."""
    return 1.0 - 0.5 * (1.0 / (2 * (2**bits - 1)) + 1.0 / 2 ** (bits + 1))


def qlora_codebook(bits: int) -> torch.Tensor:
    """bitsandbytes-style NormalFloat: exact zero, ``2^(b-1)`` positive, ``2^(b-1)-1`` negative."""
    off, half = qlora_offset(bits), 2 ** (bits - 1)
    pos = norm.ppf(np.linspace(off, 0.5, half + 1)[:-1])
    neg = -norm.ppf(np.linspace(off, 0.5, half)[:-1])
    q = np.sort(np.concatenate([pos, neg, [0.0]]))
    return torch.from_numpy(q / q.max()).float()


def nf_codebook(name: str, bits: int) -> torch.Tensor:
    if not 1 <= bits <= 8:
        raise ValueError(f"nf bits must be in 1..8, got {bits}")
    if name == "seed":
        return seed_codebook(bits)
    if name == "qlora":
        return qlora_codebook(bits)
    raise ValueError(f"nf codebook must be one of {CODEBOOKS}, got {name!r}")


def _fp16_directed(v: torch.Tensor, up: bool) -> torch.Tensor:
    """Round float32 ``v`` to fp16 towards +inf (``up``) or -inf; raise on overflow."""
    h = v.to(torch.float16)
    wrong = h.float() < v if up else h.float() > v
    h = torch.where(wrong, torch.nextafter(h, torch.full_like(h, math.inf if up else -math.inf)), h)
    if not torch.isfinite(h).all():
        raise ValueError("nf side info is non-finite or overflows fp16 (features NaN/inf or |x| > 65504)")
    return h


def _dq_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantisation of block scales ``s`` (T, nb) >= 0: uint8 codes + fp32 per-token max."""
    tok = s.amax(dim=1)
    q = torch.ceil(s / tok.clamp_min(_TINY)[:, None] * 255.0).clamp(0, 255).to(torch.uint8)
    return q, tok


def _dq_dequant(q: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    return q.float() * (tok / 255.0)[:, None]


class BlockNF:
    """Blockwise NF quantiser on ``(T, D)`` rows; shared by :class:`NFClient`/``NFServer``
    and the gradient codec. Side tensors: ``scale`` (fp16) or ``scale_q`` (uint8) +
    ``token_scale`` (fp32, one per row) and, for ``seed``, ``min`` (fp16)."""

    def __init__(self, bits: int, block: int = 64, codebook: str = "seed", double_quant: bool = False) -> None:
        self.codebook = nf_codebook(codebook, bits)
        if block < 1:
            raise ValueError(f"nf block size must be >= 1, got {block}")
        self.bits, self.block, self.kind, self.double_quant = bits, block, codebook, double_quant
        self._mids = (self.codebook[1:] + self.codebook[:-1]) / 2

    def check_dim(self, dim: int) -> None:
        if dim % self.block:
            raise ValueError(f"nf: feature dim {dim} is not divisible by block size {self.block}")

    # ---- quantise / dequantise -------------------------------------------------------
    def encode(self, x2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x2 (T, D)`` -> ``(idx (T, D) int64, side tensors)``."""
        T, D = x2.shape
        self.check_dim(D)
        blocks = x2.detach().float().reshape(T, D // self.block, self.block)
        side: dict[str, torch.Tensor] = {}
        if self.kind == "seed":
            mn16 = _fp16_directed(blocks.amin(-1), up=False)
            scale = blocks.amax(-1) - mn16.float()
            side["min"] = mn16
        else:
            scale = blocks.abs().amax(-1)
        if not torch.isfinite(scale).all():
            raise ValueError("nf: features contain NaN or inf")
        if self.double_quant:
            side["scale_q"], side["token_scale"] = _dq_scales(scale)
        else:
            side["scale"] = _fp16_directed(scale, up=True)
        s_hat, m_hat = self._side_values(side)
        if m_hat is None:
            e = blocks / s_hat.clamp_min(_TINY)[..., None]
        else:
            e = (blocks - m_hat[..., None]) / s_hat.clamp_min(_TINY)[..., None] * 2.0 - 1.0
        idx = torch.bucketize(e.clamp(-1.0, 1.0), self._mids.to(e.device))
        return idx.reshape(T, D), side

    def _side_values(self, side: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.double_quant:
            s_hat = _dq_dequant(side["scale_q"], side["token_scale"])
        else:
            s_hat = side["scale"].float()
        return s_hat, (side["min"].float() if self.kind == "seed" else None)

    def decode(self, idx: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(idx (T, D), side)`` -> ``x_hat (T, D)`` float32; identical on both ends."""
        T, D = idx.shape
        s_hat, m_hat = self._side_values(side)
        q = self.codebook.to(idx.device)[idx].reshape(T, D // self.block, self.block)
        if m_hat is None:
            out = q * s_hat[..., None]
        else:
            out = (q + 1.0) * 0.5 * s_hat[..., None] + m_hat[..., None]
        return out.reshape(T, D) + 0.0  # + 0.0 maps -0.0 to +0.0, so the STE sum is bitwise equal

    # ---- wire format ------------------------------------------------------------------
    def side_spec(self, rows: int, dim: int) -> dict[str, tuple[str, int]]:
        """Name -> (dtype, size) of every side array for ``rows`` rows of ``dim`` values."""
        nb = rows * dim // self.block
        spec = {"min": ("float16", nb)} if self.kind == "seed" else {}
        if self.double_quant:
            spec.update(scale_q=("uint8", nb), token_scale=("float32", rows))
        else:
            spec["scale"] = ("float16", nb)
        return spec

    def payload_nbytes(self, rows: int, dim: int) -> int:
        """Exact bytes: packed codes plus every side array."""
        side = sum(np.dtype(dt).itemsize * n for dt, n in self.side_spec(rows, dim).values())
        return packed_nbytes(rows * dim, self.bits) + side

    def pack(self, idx: torch.Tensor, side: dict[str, torch.Tensor]) -> Payload:
        codes = idx.detach().cpu().numpy()
        arrays = {k: v.detach().cpu().numpy().reshape(-1) for k, v in side.items()}
        return Payload(codes={"index": pack_bits(codes, self.bits)}, side=arrays, ideal_bits=float(codes.size * self.bits))

    def unpack(self, payload: Payload, rows: int, dim: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Validate every array and return ``(idx (rows, dim), side tensors)``."""
        if dim % self.block:
            raise PayloadError(f"nf: feature dim {dim} is not divisible by block size {self.block}")
        count = rows * dim
        buf = require_array(payload.codes, "index", "uint8", packed_nbytes(count, self.bits))
        spec = self.side_spec(rows, dim)
        extra = set(payload.side) - set(spec)
        if extra or set(payload.codes) != {"index"}:
            raise PayloadError(f"nf payload has unexpected arrays: {sorted(extra | (set(payload.codes) - {'index'}))}")
        side: dict[str, torch.Tensor] = {}
        for name, (dtype, size) in spec.items():
            a = require_array(payload.side, name, dtype, size)
            if a.dtype.kind == "f":
                require_finite(name, a)
                if name != "min" and (a < 0).any():
                    raise PayloadError(f"payload array '{name}' has negative scales")
            t = torch.from_numpy(a.copy())
            side[name] = t if name == "token_scale" else t.reshape(rows, dim // self.block)
        try:
            idx = unpack_bits(buf, self.bits, count)
        except PackError as err:
            raise PayloadError(str(err)) from None
        return torch.from_numpy(idx).reshape(rows, dim), side


class NFClient(ClientCodec):
    """Client half: blockwise NF quantisation of each token's ``D`` features."""

    def __init__(self, dim: int, bits: int, block: int = 64, codebook: str = "seed", double_quant: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.nf = BlockNF(bits, block, codebook, double_quant)
        self.nf.check_dim(dim)

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        if x.shape[-1] != self.dim:
            raise ValueError(f"nf expects feature dim {self.dim}, got {x.shape[-1]}")
        x2 = x.reshape(-1, self.dim)
        idx, side = self.nf.encode(x2)
        y = straight_through(self.nf.decode(idx, side).reshape(x.shape), x)
        return Encoded(y=y, codes=idx, aux_loss=x.new_zeros(()), side=side)

    def pack(self, enc: Encoded) -> Payload:
        return self.nf.pack(enc.codes, enc.side)

    def payload_nbytes(self, shape: tuple[int, int, int]) -> int:
        return self.nf.payload_nbytes(int(math.prod(shape[:-1])), shape[-1])

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return int(math.prod(shape)), self.nf.bits, 2**self.nf.bits


class NFServer(ServerCodec):
    """Server half: validate, ``codebook[idx] * scale (+ min)``; identity forward."""

    def __init__(self, dim: int, bits: int, block: int = 64, codebook: str = "seed", double_quant: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.nf = BlockNF(bits, block, codebook, double_quant)
        self.nf.check_dim(dim)

    def unpack(self, payload: Payload, shape: tuple[int, int, int]) -> torch.Tensor:
        if len(shape) != 3 or shape[-1] != self.dim:
            raise PayloadError(f"expected shape (B, N, {self.dim}), got {tuple(shape)}")
        idx, side = self.nf.unpack(payload, int(shape[0] * shape[1]), self.dim)
        return self.nf.decode(idx, side).reshape(shape)

    def array_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        rows = int(math.prod(shape[:-1]))
        sizes = {"codes.index": packed_nbytes(rows * shape[-1], self.nf.bits)}
        sizes.update({f"side.{k}": n for k, (_, n) in self.nf.side_spec(rows, shape[-1]).items()})
        return sizes

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return int(math.prod(shape)), self.nf.bits, 2**self.nf.bits

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return y_hat
