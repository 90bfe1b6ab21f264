"""The compressor interface: one definition per codec, shared by its client and server halves.

A codec is one module in ``sim/compress/codecs/`` (docs/adding-a-compressor.md). Its
:class:`Codec` subclass *declares* everything the rest of the project derives from it:

* ``Settings`` — a frozen dataclass of :func:`sim.settings.option` fields: its run-config
  keys with defaults, allowed values and help;
* ``bit_range`` and ``bit_unit`` — the widths ``bits`` may take, and what one bit counts
  (``value``: per feature value, ``token``: per token, ``None``: unused);
* ``streams`` — which streams it can serve: ``image``, ``residual``, ``text`` (uplink
  features) and ``gradient`` (the downlink);
* ``integer_codes`` — whether its payload's ``codes.index`` holds integer codes that
  entropy coding (``entropy-coding``) can compress; then :meth:`Codec.index_layout` says
  how many, of how many bits, from which alphabet;
* :meth:`Codec.layout` — its wire layout: the exact name, dtype and element count of
  every payload array for features of a given shape.

An instance (``Codec(dim, bits, settings, seed)``) is that definition for one feature
width; its :meth:`Codec.client` and :meth:`Codec.server` build the two halves, which
keep it as ``spec``::

    client: x (B,N,D) --ClientCodec.forward--> Encoded(y, codes, aux_loss) --pack--> Payload
    server: Payload --ServerCodec.unpack (layout check, then decode)--> y_hat (B,N,D)
            y_hat --ServerCodec.forward--> LLM inputs;  dL/dy_hat --(downlink)--> client

The client half is an ``nn.Module`` whose weights are FedAvg'd with the client model;
``y`` carries the straight-through gradient and equals the server's ``y_hat`` bitwise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from sim.settings import option

STREAMS = ("image", "residual", "text", "gradient")
FEATURE_STREAMS = ("image", "residual", "text")


class PayloadError(ValueError):
    """A payload from a peer that fails validation (wrong dtype/shape/range/values)."""


@dataclass(frozen=True)
class NoSettings:
    """The settings of a codec that has none but ``bits``."""


@dataclass(frozen=True)
class WireArray:
    """One payload array of the wire layout: numpy dtype name and element count (1-D)."""

    dtype: str
    count: int


Layout = dict[str, WireArray]  # "codes.<name>" / "side.<name>" -> dtype and size
IndexLayout = tuple[int, int, int]  # (number of codes, packed bits per code, alphabet size)


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
        """All arrays, code names prefixed with ``codes.``, side names with ``side.``."""
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


class Codec:
    """The one definition of a compressor (see the module docstring).

    Subclasses set the class attributes and implement :meth:`layout` plus either the two
    halves (``Client``/``Server``, for the feature streams) or :meth:`encode_gradient` /
    :meth:`decode_gradient` (for the gradient stream), or both."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for the generated tables
    streams: ClassVar[frozenset[str]]
    bit_range: ClassVar[tuple[int, int]] = (1, 16)
    bit_unit: ClassVar[str | None] = "value"
    integer_codes: ClassVar[bool] = False
    Settings: ClassVar[type] = NoSettings
    # Run-config keys that experiments comparing codecs set for this one (e.g. the split
    # point its paper uses); empty for most.
    sweep: ClassVar[dict[str, Any]] = {}
    Client: ClassVar[type[ClientCodec] | None] = None
    Server: ClassVar[type[ServerCodec] | None] = None
    # The gradient stream: whether its payload's ``codes.index`` holds integer codes that
    # ``grad-entropy-coding`` can compress (then :meth:`gradient_index_layout` says how many),
    # and whether its decode is an unbiased estimate of its input (stochastic rounding): its
    # error is then bounded in variance, not by the input's norm.
    gradient_integer_codes: ClassVar[bool] = False
    unbiased: ClassVar[bool] = False

    def __init__(self, dim: int, bits: int, settings: Any = None, seed: int = 0) -> None:
        lo, hi = self.bit_range
        if isinstance(bits, bool) or not lo <= bits <= hi:
            raise ValueError(f"{self.name} bits must be in {lo}..{hi}, got {bits}")
        self.dim, self.bits, self.seed = int(dim), int(bits), int(seed)
        self.settings = self.Settings() if settings is None else settings
        self.check(self.settings, self.bits, self.dim)

    # ---- declarations -------------------------------------------------------------------
    @classmethod
    def check(cls, settings: Any, bits: int, dim: int) -> None:
        """Rules between the settings, the width and the feature dim (raise ``ValueError``)."""

    def layout(self, shape: tuple[int, ...]) -> Layout:  # pragma: no cover - interface
        """Every payload array for features of ``shape`` ``(B, N, D)``: name -> dtype, count."""
        raise NotImplementedError

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout | None:
        """Layout of ``codes.index`` (``integer_codes`` codecs); None otherwise."""
        return None

    # ---- round-synchronised state (AlignedVQ's codebook, RD-FSQ's EMA statistics) -----
    synced_buffers: tuple[str, ...] = ()  # client-half buffers that travel with the weights
    init_flag: str | None = None  # the synced bool buffer that says the state is initialised

    def fold_synced(self, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """Next round's synced state from the FedAvg'd one (on the server, once per round)."""
        return state

    def needs_init(self, state: dict[str, torch.Tensor], prefix: str = "") -> bool:
        """Whether a client state (the codec's buffers at ``prefix``) still lacks its
        data-dependent initialisation."""
        return self.init_flag is not None and not bool(state[prefix + self.init_flag])

    # ---- halves --------------------------------------------------------------------------
    def client(self) -> ClientCodec:
        if self.Client is None:
            raise ValueError(f"codec {self.name!r} has no client half (it serves only {sorted(self.streams)})")
        return self.Client(self)

    def server(self) -> ServerCodec:
        if self.Server is None:
            raise ValueError(f"codec {self.name!r} has no server half (it serves only {sorted(self.streams)})")
        return self.Server(self)

    # ---- the gradient stream (codecs with "gradient" in streams) ------------------------
    def encode_gradient(self, g: torch.Tensor) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        """Compress a gradient (any shape, last dim ``D``) into ``codes.*`` / ``side.*`` arrays."""
        raise NotImplementedError

    def decode_gradient(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:  # pragma: no cover
        """Inverse of :meth:`encode_gradient`; validates every array (raises :class:`PayloadError`)."""
        raise NotImplementedError

    def gradient_layout(self, shape: tuple[int, ...]) -> Layout:  # pragma: no cover - interface
        """The arrays :meth:`encode_gradient` produces for a gradient of ``shape``."""
        raise NotImplementedError

    def gradient_index_layout(self, shape: tuple[int, ...]) -> IndexLayout | None:
        """Layout of the gradient payload's ``codes.index`` (``gradient_integer_codes``
        codecs); None otherwise."""
        return None


class ClientCodec(nn.Module):
    """Client half: ``forward(x) -> Encoded`` and ``pack(Encoded) -> Payload``."""

    def __init__(self, spec: Codec) -> None:
        super().__init__()
        self.spec = spec
        self.dim, self.bits = spec.dim, spec.bits

    def forward(self, x: torch.Tensor) -> Encoded:  # pragma: no cover - interface
        raise NotImplementedError

    def pack(self, enc: Encoded) -> Payload:  # pragma: no cover - interface
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.spec.name} expects feature dim {self.dim}, got {x.shape[-1]}")

    @property
    def synced_buffers(self) -> tuple[str, ...]:
        return self.spec.synced_buffers

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout | None:
        return self.spec.index_layout(shape)

    @property
    def needs_init(self) -> bool:
        return self.spec.init_flag is not None and not bool(self.get_buffer(self.spec.init_flag))

    def init_from(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from features ``x`` (B,N,D); no-op by default."""

    def start_near_identity(self) -> None:
        """Start as close to the identity as the method allows, for a compressor inserted
        into a pretrained model (``init=<checkpoint>``): square projections ``proj`` become
        the identity. AlignedVQ's DLP already starts at the identity (gamma = 0)."""
        identity_projections(self)


class ServerCodec(nn.Module):
    """Server half: ``unpack(Payload, shape) -> y_hat`` and ``forward(y_hat) -> x``.

    :meth:`unpack` checks the payload against the codec's :meth:`Codec.layout` (exact
    names, dtypes and sizes) before :meth:`decode` sees it; ``decode`` checks the values."""

    def __init__(self, spec: Codec) -> None:
        super().__init__()
        self.spec = spec
        self.dim, self.bits = spec.dim, spec.bits

    def unpack(self, payload: Payload, shape: tuple[int, int, int]) -> torch.Tensor:
        if len(shape) != 3 or shape[-1] != self.dim:
            raise PayloadError(f"expected shape (B, N, {self.dim}), got {tuple(shape)}")
        arrays = check_layout(payload.arrays(), self.spec.layout(shape), self.spec.name)
        return self.decode(arrays, tuple(int(s) for s in shape))

    def decode(self, arrays: dict[str, np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return y_hat

    def array_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        """Element count of every payload array (splits concatenated micro-batches)."""
        return {k: a.count for k, a in self.spec.layout(shape).items()}

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout | None:
        return self.spec.index_layout(shape)

    def load_synced(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Install round-synchronised client state (default: nothing to install)."""

    def start_near_identity(self) -> None:
        """As :meth:`ClientCodec.start_near_identity`."""
        identity_projections(self)


def identity_projections(codec: nn.Module) -> None:
    """Set a codec half's square linear projection ``proj`` (if it has one) to the identity."""
    proj = getattr(codec, "proj", None)
    if isinstance(proj, nn.Linear) and proj.in_features == proj.out_features:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(proj.in_features))
            if proj.bias is not None:
                proj.bias.zero_()


# ----------------------------------------------------------------------------- helpers
def check_layout(arrays: dict[str, np.ndarray], layout: Layout, codec: str) -> dict[str, np.ndarray]:
    """``arrays`` if they are exactly ``layout``'s (names, 1-D, dtypes, sizes); else PayloadError."""
    if set(arrays) != set(layout):
        raise PayloadError(f"{codec} payload must hold {sorted(layout)}, got {sorted(arrays)}")
    for name, want in layout.items():
        a = arrays[name]
        if not isinstance(a, np.ndarray):
            raise PayloadError(f"payload array '{name}' is not an ndarray")
        if a.dtype != np.dtype(want.dtype):
            raise PayloadError(f"payload array '{name}' has dtype {a.dtype}, expected {np.dtype(want.dtype)}")
        if a.ndim != 1 or a.size != want.count:
            raise PayloadError(f"payload array '{name}' has shape {a.shape}, expected ({want.count},)")
    return arrays


def ema_decay_option():
    """The ``ema-decay`` setting, shared by every codec with running statistics (RD-FSQ's
    ``ema`` statistics, AlignedVQ's codebook): declare a field with it."""
    return option(0.99, "per-step EMA decay of the AlignedVQ codebook statistics and of `rdfsq-stats=ema` "
                  "(set explicitly: vector-quantize-pytorch defaults to 0.8)", lo=0.0, hi=0.999999, key="ema-decay")


def fp16_directed(v: torch.Tensor, up: bool) -> torch.Tensor:
    """Round float32 ``v`` to fp16 towards +inf (``up``) or -inf, so that side information
    sent as fp16 still bounds what it describes (a block's minimum rounded down, its range
    up); raises ``ValueError`` on NaN/inf or values beyond the fp16 range."""
    h = v.to(torch.float16)
    wrong = h.float() < v if up else h.float() > v
    h = torch.where(wrong, torch.nextafter(h, torch.full_like(h, math.inf if up else -math.inf)), h)
    if not torch.isfinite(h).all():
        raise ValueError("side information is non-finite or overflows fp16 (features NaN/inf or |x| > 65504)")
    return h


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


def content_seed(seed: int, t: torch.Tensor) -> int:
    """A 63-bit generator seed from ``seed`` and the exact bytes of ``t``: an encoder that
    draws random numbers from it is deterministic given the config's seed and its input,
    and draws afresh for every other input (BLAKE2b, ``hashlib``)."""
    data = t.detach().float().contiguous().cpu().numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8, key=int(seed).to_bytes(8, "little", signed=False)).digest()
    return int.from_bytes(digest, "little") >> 1


def numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def rows_of(shape: tuple[int, ...]) -> int:
    """Tokens (rows of the last dim) in a tensor of ``shape``."""
    return int(math.prod(shape[:-1]))
