"""Blockwise NormalFloat (NF-b) quantisation: Quantized-TinyLLaVA's "b-bit QLoRA" baseline.

Features are cut, per token, into blocks of ``G`` consecutive values (``D % G == 0``);
each block is scaled to [-1, 1] and every value is replaced by the index of the
nearest entry of a ``2^b``-entry NormalFloat codebook (QLoRA, Dettmers et al. 2023,
section 3 "4-bit NormalFloat Quantization", arXiv 2305.14314). Two codebooks:

* ``seed`` (the public code of Quantized-TinyLLaVA, arXiv 2511.23402): ``q_i = Phi^-1(p_i) / max_j |Phi^-1(p_j)|``
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

from dataclasses import dataclass

import numpy as np
import torch

from sim.settings import option

from ..base import (
    ClientCodec, Codec, Encoded, IndexLayout, Layout, Payload, PayloadError, ServerCodec, WireArray, check_layout,
    fp16_directed, numel, require_finite, rows_of, straight_through,
)
from ..packing import pack_bits, packed_nbytes, unpack_codes

CODEBOOKS = ("seed", "qlora")
_TINY = 1e-30  # divisor floor for all-zero / constant blocks (their codes are exact anyway)


def seed_codebook(bits: int) -> torch.Tensor:
    """``Phi^-1((i + 0.5)/2^b) / max|Phi^-1|`` for ``i = 0..2^b-1`` (ascending, float32)."""
    from scipy.stats import norm  # imported when a codebook is built: scipy.stats is slow to import

    q = norm.ppf((np.arange(2**bits) + 0.5) / 2**bits)
    return torch.from_numpy(q / np.abs(q).max()).float()


def qlora_offset(bits: int) -> float:
    """Outermost quantile ``o_b``; ``o_4 = 0.96770833`` is bitsandbytes' 0.9677083."""
    return 1.0 - 0.5 * (1.0 / (2 * (2**bits - 1)) + 1.0 / 2 ** (bits + 1))


def qlora_codebook(bits: int) -> torch.Tensor:
    """bitsandbytes-style NormalFloat: exact zero, ``2^(b-1)`` positive, ``2^(b-1)-1`` negative."""
    from scipy.stats import norm

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
            mn16 = fp16_directed(blocks.amin(-1), up=False)
            scale = blocks.amax(-1) - mn16.float()
            side["min"] = mn16
        else:
            scale = blocks.abs().amax(-1)
        if not torch.isfinite(scale).all():
            raise ValueError("nf: features contain NaN or inf")
        if self.double_quant:
            side["scale_q"], side["token_scale"] = _dq_scales(scale)
        else:
            side["scale"] = fp16_directed(scale, up=True)
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

    def layout(self, rows: int, dim: int) -> Layout:
        """Every payload array: packed codes plus the side arrays."""
        out = {"codes.index": WireArray("uint8", packed_nbytes(rows * dim, self.bits))}
        out |= {f"side.{k}": WireArray(dt, n) for k, (dt, n) in self.side_spec(rows, dim).items()}
        return out

    def payload_nbytes(self, rows: int, dim: int) -> int:
        """Exact bytes: packed codes plus every side array."""
        return sum(np.dtype(a.dtype).itemsize * a.count for a in self.layout(rows, dim).values())

    def pack(self, idx: torch.Tensor, side: dict[str, torch.Tensor]) -> Payload:
        codes = idx.detach().cpu().numpy()
        arrays = {k: v.detach().cpu().numpy().reshape(-1) for k, v in side.items()}
        return Payload(codes={"index": pack_bits(codes, self.bits)}, side=arrays, ideal_bits=float(codes.size * self.bits))

    def unpack(self, arrays: dict[str, np.ndarray], rows: int, dim: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Validate every array (``codes.index`` and ``side.*``) and return ``(idx (rows, dim), side tensors)``."""
        if dim % self.block:
            raise PayloadError(f"nf: feature dim {dim} is not divisible by block size {self.block}")
        check_layout(arrays, self.layout(rows, dim), "nf")
        side: dict[str, torch.Tensor] = {}
        for name in self.side_spec(rows, dim):
            a = arrays[f"side.{name}"]
            if a.dtype.kind == "f":
                require_finite(name, a)
                if name != "min" and (a < 0).any():
                    raise PayloadError(f"payload array '{name}' has negative scales")
            t = torch.from_numpy(a.copy())
            side[name] = t if name == "token_scale" else t.reshape(rows, dim // self.block)
        idx = unpack_codes(arrays["codes.index"], self.bits, rows * dim)
        return torch.from_numpy(idx).reshape(rows, dim), side


@dataclass(frozen=True)
class NFSettings:
    block: int = option(64, "NF block size G (values per block; must divide the feature width)", lo=1, hi=1 << 20)
    codebook: str = option("seed", "NF codebook: `seed` (Phi^-1((i+0.5)/2^b), min/max scaling, the paper's code) or "
                           "`qlora` (bitsandbytes NormalFloat, absmax scaling)", choices=CODEBOOKS)
    double_quant: bool = option(False, "double quantisation of the NF block scales (uint8 per block, one fp32 per token)")


class NFClient(ClientCodec):
    """Client half: blockwise NF quantisation of each token's ``D`` features."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        self.nf = spec.block_nf()

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        self.check_input(x)
        x2 = x.reshape(-1, self.dim)
        idx, side = self.nf.encode(x2)
        y = straight_through(self.nf.decode(idx, side).reshape(x.shape), x)
        return Encoded(y=y, codes=idx, aux_loss=x.new_zeros(()), side=side)

    def pack(self, enc: Encoded) -> Payload:
        return self.nf.pack(enc.codes, enc.side)


class NFServer(ServerCodec):
    """Server half: validate, ``codebook[idx] * scale (+ min)``; identity forward."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        self.nf = spec.block_nf()

    def decode(self, arrays: dict[str, np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:
        idx, side = self.nf.unpack(arrays, rows_of(shape), self.dim)
        return self.nf.decode(idx, side).reshape(shape)


GRAD_BLOCK = 64  # the gradient stream: blocks of 64 over the flattened gradient, qlora codebook


class NF(Codec):
    """NF-b on features (blocks of ``nf-block`` per token, ``nf-codebook``) and on the
    downlink gradient (``grad-compressor=nf``: the flattened gradient zero-padded to blocks
    of 64, the ``qlora`` codebook with fp16 absmax per block; the padding's codes are sent)."""

    name = "nf"
    summary = "blockwise NormalFloat (QLoRA's NF-b): per-block scale, 2^b-entry normal codebook"
    streams = frozenset({"image", "residual", "text", "gradient"})
    bit_range = (1, 8)
    integer_codes = True
    gradient_integer_codes = True
    Settings = NFSettings
    Client, Server = NFClient, NFServer

    @classmethod
    def check(cls, settings: NFSettings, bits: int, dim: int) -> None:
        if dim and dim % settings.block:
            raise ValueError(f"nf-block ({settings.block}) must divide the feature width ({dim})")

    def block_nf(self) -> BlockNF:
        s = self.settings
        return BlockNF(self.bits, s.block, s.codebook, s.double_quant)

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return self.block_nf().layout(rows_of(shape), shape[-1])

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return numel(shape), self.bits, 2**self.bits

    # ---- the gradient stream -----------------------------------------------------------
    def _grad_nf(self) -> BlockNF:
        return BlockNF(self.bits, GRAD_BLOCK, "qlora")

    def gradient_layout(self, shape: tuple[int, ...]) -> Layout:
        return self._grad_nf().layout(-(-numel(shape) // GRAD_BLOCK), GRAD_BLOCK)

    def gradient_index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return -(-numel(shape) // GRAD_BLOCK) * GRAD_BLOCK, self.bits, 2**self.bits

    def encode_gradient(self, g: torch.Tensor) -> dict[str, np.ndarray]:
        flat = g.detach().reshape(-1).float().clamp(-FP16_MAX, FP16_MAX)
        padded = torch.zeros(-(-flat.numel() // GRAD_BLOCK) * GRAD_BLOCK, dtype=torch.float32, device=flat.device)
        padded[: flat.numel()] = flat
        nf = self._grad_nf()
        idx, side = nf.encode(padded.reshape(-1, GRAD_BLOCK))
        return nf.pack(idx, side).arrays()

    def decode_gradient(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        n = numel(shape)
        nf = self._grad_nf()
        idx, side = nf.unpack(arrays, -(-n // GRAD_BLOCK), GRAD_BLOCK)
        return nf.decode(idx, side).reshape(-1)[:n].reshape(shape)


FP16_MAX = 65504.0
CODEC = NF
