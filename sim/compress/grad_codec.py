"""Downlink compression of the feature gradient ``dL/dy_hat`` (server -> client).

Paper 000 compresses only the uplink features; the gradient of the same size goes
back every step. Methods (the uplink codecs' building blocks, reused):

* ``none``: fp32, ``4 n`` bytes;
* ``fp16``: saturating fp16 cast, ``2 n`` bytes;
* ``topk``: per row of the last dim, the ``k = round(b/16 * D)`` largest-magnitude
  entries (no random share), fp16 values + cheaper of bitmask / index list
  (:mod:`sim.compress.topk`);
* ``nf``: blockwise NormalFloat with the bitsandbytes-style ``qlora`` codebook, blocks
  of 64 over the flattened gradient (zero-padded to a multiple of 64; the padding's
  codes are sent), fp16 absmax per block (:mod:`sim.compress.nf`).

Data flow: ``g (any shape) -> encode_grads -> arrays -> decode_grads(shape) -> g_hat``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import Payload, PayloadError, require_array, require_finite
from .nf import BlockNF
from .topk import FP16_MAX, keep_counts, pack_sparse, payload_nbytes, select_positions, to_fp16, unpack_sparse

METHODS = ("none", "fp16", "topk", "nf")
NF_BLOCK = 64


def _check(method: str, bits: int) -> None:
    if method not in METHODS:
        raise ValueError(f"grad compressor must be one of {METHODS}, got {method!r}")
    if method == "nf" and not 1 <= bits <= 8:
        raise ValueError(f"nf gradient bits must be in 1..8, got {bits}")
    if method == "topk" and not 1 <= bits <= 16:
        raise ValueError(f"topk gradient bits must be in 1..16, got {bits}")


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    dim = int(shape[-1]) if len(shape) else 1
    return (int(math.prod(shape)) // dim if dim else 0), dim


def grad_nbytes(shape: tuple[int, ...], method: str, bits: int) -> int:
    """Exact bytes that :func:`encode_grads` produces for a gradient of ``shape``."""
    _check(method, bits)
    n = int(math.prod(shape))
    if method in ("none", "fp16"):
        return n * (4 if method == "none" else 2)
    if method == "topk":
        rows, dim = _rows(shape)
        return payload_nbytes(rows, dim, keep_counts(dim, bits, 0.0)[0])
    padded = -(-n // NF_BLOCK) * NF_BLOCK
    return BlockNF(bits, NF_BLOCK, "qlora").payload_nbytes(padded // NF_BLOCK, NF_BLOCK)


def encode_grads(g: torch.Tensor, method: str, bits: int) -> dict[str, np.ndarray]:
    """Compress gradient ``g`` into named numpy arrays (``codes.*`` / ``side.*``)."""
    _check(method, bits)
    g = g.detach()
    if method == "none":
        return {"codes.values": g.float().cpu().numpy().reshape(-1)}
    if method == "fp16":
        return {"codes.values": to_fp16(g).cpu().numpy().reshape(-1)}
    if method == "topk":
        rows, dim = _rows(tuple(g.shape))
        g2 = g.reshape(rows, dim).float()
        pos = select_positions(g2, keep_counts(dim, bits, 0.0)[0], 0)
        codes, side = pack_sparse(pos, to_fp16(torch.gather(g2, 1, pos)), dim)
        return Payload(codes=codes, side=side).arrays()
    flat = g.reshape(-1).float().clamp(-FP16_MAX, FP16_MAX)
    padded = torch.zeros(-(-flat.numel() // NF_BLOCK) * NF_BLOCK, dtype=torch.float32, device=flat.device)
    padded[: flat.numel()] = flat
    nf = BlockNF(bits, NF_BLOCK, "qlora")
    idx, side = nf.encode(padded.reshape(-1, NF_BLOCK))
    return nf.pack(idx, side).arrays()


def decode_grads(arrays: dict[str, np.ndarray], shape: tuple[int, ...], method: str, bits: int) -> torch.Tensor:
    """Inverse of :func:`encode_grads`; validates every array, raising :class:`PayloadError`."""
    _check(method, bits)
    shape = tuple(int(s) for s in shape)
    n = int(math.prod(shape))
    payload = Payload.from_arrays(arrays)
    if method in ("none", "fp16"):
        if set(arrays) != {"codes.values"}:
            raise PayloadError(f"{method} gradient payload must be exactly 'codes.values', got {sorted(arrays)}")
        a = require_array(payload.codes, "values", np.float32 if method == "none" else np.float16, n)
        require_finite("values", a)
        return torch.from_numpy(a.astype(np.float32)).reshape(shape)
    if method == "topk":
        rows, dim = _rows(shape)
        pos, vals = unpack_sparse(payload, rows, dim, keep_counts(dim, bits, 0.0)[0])
        out = torch.zeros(rows, dim, dtype=torch.float32).scatter_(1, pos, vals.float())
        return out.reshape(shape)
    nf = BlockNF(bits, NF_BLOCK, "qlora")
    idx, side = nf.unpack(payload, -(-n // NF_BLOCK), NF_BLOCK)
    return nf.decode(idx, side).reshape(-1)[:n].reshape(shape)
