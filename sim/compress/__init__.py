"""Feature compressors: an exact-match registry of (client half, server half) pairs.

``build_codecs(cfg, dim)`` returns the two halves for the configured compressor.
Registering a name twice raises; an unknown name raises with the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import ClientCodec, Encoded, IndexLayout, Payload, PayloadError, ServerCodec
from .fsq import FSQClient, FSQServer
from .identity import IdentityClient, IdentityServer
from .nf import NFClient, NFServer
from .packing import PackError, pack_bits, packed_nbytes, unpack_bits
from .rdfsq import RDFSQClient, RDFSQServer
from .topk import TopKClient, TopKServer
from .vq import VQClient, VQServer

if TYPE_CHECKING:
    from sim.config import SplitConfig

CodecFactory = Callable[["SplitConfig", int], tuple[ClientCodec, ServerCodec]]
_REGISTRY: dict[str, CodecFactory] = {}


def register(name: str) -> Callable[[CodecFactory], CodecFactory]:
    """Register a factory ``(cfg, dim) -> (client, server)`` under an exact name."""

    def deco(fn: CodecFactory) -> CodecFactory:
        if name in _REGISTRY:
            raise ValueError(f"compressor {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_codecs(cfg: SplitConfig, dim: int) -> tuple[ClientCodec, ServerCodec]:
    """The client and server halves of ``cfg.compressor`` for features of width ``dim``."""
    if cfg.compressor not in _REGISTRY:
        raise ValueError(f"unknown compressor {cfg.compressor!r}; valid: {', '.join(names())}")
    return _REGISTRY[cfg.compressor](cfg, dim)


@register("identity")
def _identity(cfg: SplitConfig, dim: int) -> tuple[ClientCodec, ServerCodec]:
    return IdentityClient(dim, cfg.identity_dtype), IdentityServer(dim, cfg.identity_dtype)


@register("rdfsq")
def _rdfsq(cfg: SplitConfig, dim: int) -> tuple[ClientCodec, ServerCodec]:
    client = RDFSQClient(dim, cfg.bits, cfg.rdfsq_stats, cfg.rdfsq_alpha, cfg.rdfsq_send_range, cfg.ema_decay)
    return client, RDFSQServer(dim, cfg.bits, cfg.rdfsq_stats, cfg.rdfsq_send_range)


__all__ = [
    "ClientCodec", "Encoded", "IndexLayout", "Payload", "PayloadError", "ServerCodec", "PackError",
    "build_codecs", "names", "pack_bits", "packed_nbytes", "register", "unpack_bits",
]


@register("fsq")
def _fsq(cfg: SplitConfig, dim: int) -> tuple[ClientCodec, ServerCodec]:
    return FSQClient(dim, cfg.bits), FSQServer(dim, cfg.bits)


@register("nf")
def _nf(cfg: SplitConfig, dim: int) -> tuple[ClientCodec, ServerCodec]:
    kw = {"block": cfg.nf_block, "codebook": cfg.nf_codebook, "double_quant": cfg.nf_double_quant}
    return NFClient(dim, cfg.bits, **kw), NFServer(dim, cfg.bits, **kw)


@register("topk")
def _topk(cfg: SplitConfig, dim: int) -> tuple[ClientCodec, ServerCodec]:
    return TopKClient(dim, cfg.bits, cfg.topk_random, seed=cfg.seed), TopKServer(dim, cfg.bits, cfg.topk_random)


@register("vq")
def _vq(cfg: SplitConfig, dim: int) -> tuple[ClientCodec, ServerCodec]:
    client = VQClient(dim, cfg.bits, beta=cfg.vq_beta, decay=cfg.ema_decay, kmeans_iters=cfg.vq_kmeans_iters, seed=cfg.seed)
    return client, VQServer(dim, cfg.bits)
