"""The compressor interface shared by client and server.

Every compressor is one module with two halves built from the same class:

* the **client half** (an ``nn.Module`` whose weights are FedAvg'd with the rest of
  the client model) maps features ``(B, N, D)`` to an :class:`Encoded` whose ``y``
  is the differentiable (straight-through) value the server will reconstruct, and
  packs it into a :class:`Payload` of plain numpy arrays;
* the **server half** (an ``nn.Module`` trained on the server) unpacks a payload
  back into ``y_hat`` (bitwise equal to the client's ``y``) after validating every
  array, and maps ``y_hat`` to the LLM's input space.

Data flow::

    client: x (B,N,D) --encode--> Encoded(y, codes, aux_loss) --pack--> Payload
    server: Payload --unpack--> y_hat (B,N,D) --forward--> LLM inputs (B,N,D)
    server: dL/dy_hat --(downlink)--> client: y.backward(dL/dy_hat)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


class PayloadError(ValueError):
    """A payload from a peer that fails validation (wrong dtype/shape/range/values)."""


@dataclass
class Payload:
    """What crosses the wire for one batch: named numpy arrays with exact sizes.

    ``codes`` holds the quantised features, ``side`` any side information the
    decoder needs (scales, minimums, positions). ``ideal_bits`` is the information
    content ``n * log2(levels)`` of the codes, kept apart from the actual bytes.
    """

    codes: dict[str, np.ndarray]
    side: dict[str, np.ndarray] = field(default_factory=dict)
    ideal_bits: float = 0.0

    @property
    def code_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.codes.values()))

    @property
    def side_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.side.values()))

    @property
    def nbytes(self) -> int:
        return self.code_bytes + self.side_bytes

    def arrays(self) -> dict[str, np.ndarray]:
        """All arrays, code names first, side names prefixed with ``side.``."""
        out = {f"codes.{k}": v for k, v in self.codes.items()}
        out.update({f"side.{k}": v for k, v in self.side.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Payload:
        codes = {k[6:]: v for k, v in arrays.items() if k.startswith("codes.")}
        side = {k[5:]: v for k, v in arrays.items() if k.startswith("side.")}
        unknown = set(arrays) - {f"codes.{k}" for k in codes} - {f"side.{k}" for k in side}
        if unknown:
            raise PayloadError(f"unexpected payload arrays: {sorted(unknown)}")
        return cls(codes=codes, side=side)


@dataclass
class Encoded:
    """Client-side result: ``y`` carries the straight-through gradient path."""

    y: torch.Tensor  # (B, N, D) float32, equals what the server reconstructs
    codes: torch.Tensor  # integer codes or the raw values for pass-through
    aux_loss: torch.Tensor  # scalar regulariser added on the client (0 if none)
    side: dict[str, torch.Tensor] = field(default_factory=dict)


IndexLayout = tuple[int, int, int]  # (number of codes, packed bits per code, alphabet size)


class ClientCodec(nn.Module):
    """Client half: ``forward(x) -> Encoded`` and ``pack(Encoded) -> Payload``.

    Round-synchronised state (optional; AlignedVQ's codebook, RD-FSQ's EMA statistics):
    ``synced_buffers`` names buffers that must travel with the client weights and be
    FedAvg'd; ``fold_synced`` turns the averaged state into next round's state (on the
    server, once per round); ``needs_init``/``init_from`` run the data-dependent
    initialisation (k-means, first statistics) before round 1."""

    synced_buffers: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> Encoded:  # pragma: no cover - interface
        raise NotImplementedError

    def pack(self, enc: Encoded) -> Payload:  # pragma: no cover - interface
        raise NotImplementedError

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout | None:
        """Layout of ``codes.index`` for features of ``shape``; None without integer codes."""
        return None

    @property
    def needs_init(self) -> bool:
        return False

    def init_from(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from features ``x`` (B,N,D); no-op by default."""

    @staticmethod
    def fold_synced(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """Next round's synced state from the FedAvg'd one (default: unchanged)."""
        return state


class ServerCodec(nn.Module):
    """Server half: ``unpack(Payload, shape) -> y_hat`` and ``forward(y_hat) -> x``.

    ``array_sizes(shape)`` gives the exact element count of every payload array for a
    batch of ``shape`` (used to split concatenated micro-batches of unequal sizes and
    to validate them); ``load_synced`` installs the round-synchronised client state
    the server half needs to decode (AlignedVQ's codebook)."""

    def unpack(self, payload: Payload, shape: tuple[int, int, int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def array_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:  # pragma: no cover - interface
        raise NotImplementedError

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout | None:
        return None

    def load_synced(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Install round-synchronised client state (default: nothing to install)."""


def straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, identity gradient to ``source`` in the backward."""
    if not (torch.is_grad_enabled() and source.requires_grad):
        return value.detach()  # nothing to route a gradient to (encode under no_grad)
    return value.detach() + (source - source.detach())  # value exactly; d/dsource = 1


def require_array(arrays: dict[str, np.ndarray], name: str, dtype: np.dtype, size: int) -> np.ndarray:
    """Fetch a 1-D payload array and check its dtype and element count."""
    if name not in arrays:
        raise PayloadError(f"payload is missing array '{name}'")
    a = arrays[name]
    if not isinstance(a, np.ndarray):
        raise PayloadError(f"payload array '{name}' is not an ndarray")
    if a.dtype != np.dtype(dtype):
        raise PayloadError(f"payload array '{name}' has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.ndim != 1 or a.size != size:
        raise PayloadError(f"payload array '{name}' has shape {a.shape}, expected ({size},)")
    return a


def require_finite(name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise PayloadError(f"payload array '{name}' contains NaN or inf")
