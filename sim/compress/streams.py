"""The typed bundle of a micro-batch's uplink streams, passed between the halves.

A micro-batch crosses the split as one value per active stream (:func:`sim.config.active_streams`)::

    image     (B, N, D)    the features at the split point          always
    residual  (B, N, Dv)   the residual stream of ViT block k       vit-ln1:k, residual-mode=transmit
    text      (1, L, D)    the micro-batch's L text-token embeddings text-mode=quantized

and its gradients come back the same way. :class:`Streams` holds any per-stream value:
the client's :class:`~sim.compress.base.Encoded` outputs, the packed payloads, the
server's decoded ``y_hat`` tensors, the gradients, or the codecs themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

UPLINK = ("image", "residual", "text")


@dataclass(frozen=True)
class Streams(Generic[T]):
    """One value per active uplink stream; ``image`` is always there."""

    image: T
    residual: T | None = None
    text: T | None = None

    def items(self) -> Iterator[tuple[str, T]]:
        """``(stream, value)`` of the active streams, in :data:`UPLINK` order."""
        for name in UPLINK:
            v = getattr(self, name)
            if v is not None:
                yield name, v

    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items())

    def values(self) -> list[T]:
        return [v for _, v in self.items()]

    def __getitem__(self, name: str) -> T:
        v = getattr(self, name) if name in UPLINK else None
        if v is None:
            raise KeyError(f"stream {name!r} is not active here (active: {', '.join(self.names())})")
        return v

    def __contains__(self, name: str) -> bool:
        return name in UPLINK and getattr(self, name) is not None

    def map(self, fn: Callable[[str, T], U]) -> Streams[U]:
        """``fn(stream, value)`` of every active stream."""
        return Streams(**{n: fn(n, v) for n, v in self.items()})

    @classmethod
    def of(cls, values: Mapping[str, T]) -> Streams[T]:
        """From a ``{stream: value}`` mapping (unknown names raise)."""
        unknown = set(values) - set(UPLINK)
        if unknown or "image" not in values:
            raise ValueError(f"streams must include 'image' and be among {UPLINK}, got {sorted(values)}")
        return cls(**values)

    @staticmethod
    def zip(bundles: list[Streams[T]]) -> Streams[list[T]]:
        """Per stream, the list of every bundle's value (all bundles share the same streams)."""
        names = bundles[0].names()
        if any(b.names() != names for b in bundles):
            raise ValueError("bundles with different streams")
        return Streams(**{n: [b[n] for b in bundles] for n in names})
