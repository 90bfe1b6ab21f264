"""The codec registry: every module of ``sim/compress/codecs/`` is one codec.

A codec module defines ``CODEC``, its :class:`sim.compress.base.Codec` subclass, named
like the module (``codecs/rdfsq.py`` -> ``"rdfsq"``). The registry imports every module
of that folder once, in name order, and checks each declaration; adding a codec is adding
a module there (docs/adding-a-compressor.md). Lookups are exact: an unknown name raises
with the valid ones, and a name registered twice raises.
"""

from __future__ import annotations

import importlib
import pkgutil

from . import codecs as _codecs_package
from .base import STREAMS, Codec

_REGISTRY: dict[str, type[Codec]] = {}


def register(codec: type[Codec]) -> type[Codec]:
    """Add a codec class (checks its declaration; a name registered twice raises)."""
    if not (isinstance(codec, type) and issubclass(codec, Codec)):
        raise TypeError(f"{codec!r} is not a sim.compress.base.Codec subclass")
    for attr in ("name", "summary", "streams"):
        if not hasattr(codec, attr):
            raise TypeError(f"codec {codec.__qualname__} does not declare '{attr}'")
    if codec.name in _REGISTRY:
        raise ValueError(f"compressor {codec.name!r} is already registered")
    if not codec.streams or not set(codec.streams) <= set(STREAMS):
        raise ValueError(f"codec {codec.name!r}: streams must be a non-empty subset of {STREAMS}")
    lo, hi = codec.bit_range
    if not 1 <= lo <= hi <= 16:
        raise ValueError(f"codec {codec.name!r}: bit_range {codec.bit_range} is not within 1..16")
    if codec.bit_unit not in ("value", "token", None):
        raise ValueError(f"codec {codec.name!r}: bit_unit must be 'value', 'token' or None")
    features = set(codec.streams) - {"gradient"}
    if features and (codec.Client is None or codec.Server is None):
        raise ValueError(f"codec {codec.name!r} serves {sorted(features)} but lacks a Client or Server half")
    _REGISTRY[codec.name] = codec
    return codec


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(_codecs_package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_codecs_package.__name__}.{info.name}")
        codec = getattr(module, "CODEC", None)
        if codec is None:
            raise TypeError(f"{module.__name__} is in the codec folder but defines no CODEC")
        if getattr(codec, "name", None) != info.name:
            raise ValueError(f"{module.__name__} defines codec {getattr(codec, 'name', None)!r}; name it {info.name!r}")
        register(codec)


def codec_names(stream: str | None = None) -> tuple[str, ...]:
    """The registered codec names (sorted), or those that can serve ``stream``."""
    if stream is not None and stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; valid: {', '.join(STREAMS)}")
    return tuple(sorted(n for n, c in _REGISTRY.items() if stream is None or stream in c.streams))


def get_codec(name: str) -> type[Codec]:
    """The codec class registered as ``name`` (exact match)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; valid: {', '.join(codec_names())}")
    return _REGISTRY[name]


def make_codec(name: str, dim: int, bits: int, settings=None, seed: int = 0) -> Codec:
    """The definition of codec ``name`` for features of width ``dim`` (both halves build from it)."""
    return get_codec(name)(dim, bits, settings, seed)


_discover()
