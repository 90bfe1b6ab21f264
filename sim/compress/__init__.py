"""Feature and gradient compressors: one module per codec in ``codecs/``, found by the registry.

``make_codec(name, dim, bits, settings)`` gives a codec's definition; its ``client()`` and
``server()`` build the two halves (:mod:`sim.compress.base`). What a codec declares —
settings, bit range, streams, integer codes, wire layout — is the single source for
config validation, the generated option tables, the experiments' method lists and the
property tests (docs/adding-a-compressor.md).
"""

from __future__ import annotations

from .base import (
    FEATURE_STREAMS, STREAMS, ClientCodec, Codec, Encoded, IndexLayout, Layout, NoSettings, Payload, PayloadError,
    ServerCodec, WireArray,
)
from .packing import PackError, pack_bits, packed_nbytes, unpack_bits
from .registry import codec_names, get_codec, make_codec, register

__all__ = [
    "FEATURE_STREAMS", "STREAMS", "ClientCodec", "Codec", "Encoded", "IndexLayout", "Layout", "NoSettings", "PackError",
    "Payload", "PayloadError", "ServerCodec", "WireArray", "codec_names", "get_codec", "make_codec", "pack_bits",
    "packed_nbytes", "register", "unpack_bits",
]
