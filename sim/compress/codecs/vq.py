"""AlignedVQ: vector quantisation with a Dual Linear Projection (LLaVA-AlignedVQ, arXiv 2411.05961).

LLaVA-AlignedVQ, section 3.2 and Eq. (2)-(3):

1. client, DLP in:  ``Z = Z_in + tanh(gamma_in) * Linear_in(Z_in)``;
2. client, VQ: the index ``i`` of the nearest (Euclidean) codeword of each token,
   one index per token, packed at ``bits`` bits: ``ceil(B*N*bits/8)`` bytes, no
   side information. ``y = e_i`` with the straight-through estimator to ``Z``;
3. server: ``Z_q = codebook[i]`` (bitwise the client's ``y``), then DLP out:
   ``Z_out = Z_q + tanh(gamma_out) * Linear_out(Z_q)``; ``gamma_in = gamma_out = 0``
   at init, so the DLP starts as the identity;
4. client loss ``beta * ||Z - sg(e_i)||^2`` (the commitment term of Eq. 3).

The codebook is ``vector_quantize_pytorch.VectorQuantize`` with every choice set
explicitly: ``2**bits`` codes (or ``codebook_size <= 2**bits``); k-means init
(``kmeans_init=True``, ``kmeans_iters``), run once by :meth:`VQClient.init_codebook`
under a forked, seeded RNG; EMA updates with ``decay=0.99`` (the library defaults to
0.8); ``commitment_weight=beta=0.25``; the plain straight-through estimator, i.e.
``rotation_trick=False`` (the library's default for ``dim > 1`` is the rotation
trick) and ``directional_reparam=False`` (the library's ``straight_through`` flag is
Gumbel straight-through sampling, left off); no dead-code replacement, no
torch.distributed sync, Euclidean distance, a non-learnable (EMA) codebook.

Codebook sync and the EMA schedule. The codebook encodes on every client and
decodes on the server, so it must be bitwise the same on both. Hence:

* ``forward`` never changes the codebook: encoding under ``no_grad`` and the later
  recompute with grad give bitwise the same codes and ``y``. A forward in training
  mode with grad enabled (the recompute in ``client_apply_grads``: once per
  optimiser step) adds the batch to the EMA statistics ``embed_avg`` and
  ``cluster_size`` (``manual_ema_update=True``); ``embed`` stays put.
* The codebook follows the EMA once per round: the round engine FedAvgs the client
  buffers (:data:`CODEBOOK_BUFFERS`, relative to the codec), calls :func:`fold_ema`
  (the library's ``update_ema`` formula) on the averaged state, sends that state to
  the clients and :func:`codebook_from_state` of it to
  :meth:`VQServer.load_codebook`. Averaging the EMA sums and counts, then
  normalising, is the federated form of the EMA k-means update.
* The buffers are not ``requires_grad`` parameters: whoever stores, sends or
  averages client weights must include them (``initted`` is a bool; the average
  of identical flags is the flag).

Only ``init_codebook``, ``fold_ema`` and loading a state change ``embed``. The server
sees the codebook (it needs it to decode) and the averaged usage counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sim.settings import option

from ..base import (
    ClientCodec, Codec, Encoded, IndexLayout, Layout, Payload, PayloadError, ServerCodec, WireArray,
    ema_decay_option, rows_of, straight_through,
)
from ..packing import pack_bits, packed_nbytes, unpack_codes

EMBED, EMBED_AVG, CLUSTER_SIZE, INITTED = (f"vq._codebook.{n}" for n in ("embed", "embed_avg", "cluster_size", "initted"))
CODEBOOK_BUFFERS = (EMBED, EMBED_AVG, CLUSTER_SIZE, INITTED)  # state-dict keys relative to VQClient
EPS = 1e-5  # Laplace smoothing of the cluster sizes (library default, set explicitly)


def _codebook_size(bits: int, codebook_size: int | None) -> int:
    if not 1 <= bits <= 16:
        raise ValueError(f"vq bits must be in 1..16, got {bits}")
    size = 2**bits if codebook_size is None else codebook_size
    if not 2 <= size <= 2**bits:
        raise ValueError(f"vq codebook size must be in 2..{2**bits} for {bits} bits, got {size}")
    return size


def codebook_keys(prefix: str = "") -> tuple[str, ...]:
    """The codec buffers' names in a state dict where the codec sits at ``prefix``."""
    return tuple(prefix + k for k in CODEBOOK_BUFFERS)


def lookup(codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Decode, the same on both sides: ``(K, D)`` codebook, ``(...)`` indices -> ``(..., D)``."""
    return F.embedding(index, codebook)


def fold_ema(state: dict[str, torch.Tensor], prefix: str = "", eps: float = EPS) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose codebook is ``embed_avg / smoothed cluster_size``."""
    from vector_quantize_pytorch.vector_quantize_pytorch import laplace_smoothing  # see VQClient.__init__

    cs, avg = state[prefix + CLUSTER_SIZE], state[prefix + EMBED_AVG]
    n = laplace_smoothing(cs, cs.shape[-1], eps) * cs.sum(dim=-1, keepdim=True)
    out = dict(state)
    out[prefix + EMBED] = avg / n.unsqueeze(-1)
    return out


def codebook_from_state(state: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """The ``(K, D)`` codebook in a client state dict (for :meth:`VQServer.load_codebook`)."""
    key = prefix + EMBED
    if key not in state:
        raise KeyError(f"no VQ codebook {key!r} in the client state")
    if not bool(state[prefix + INITTED]):
        raise ValueError("the VQ codebook in the client state was never initialised")
    embed = state[key]
    if embed.ndim != 3 or embed.shape[0] != 1:
        raise ValueError(f"VQ codebook {key!r} has shape {tuple(embed.shape)}, expected (1, K, D)")
    return embed[0].detach().clone()


@dataclass(frozen=True)
class VQSettings:
    beta: float = option(0.25, "AlignedVQ commitment weight beta", lo=0.0, hi=100.0)
    kmeans_iters: int = option(10, "k-means iterations of the AlignedVQ codebook initialisation (one client, before "
                               "round 1)", lo=1, hi=1000)
    ema_decay: float = ema_decay_option()


class VQClient(ClientCodec):
    """Client half: DLP in, nearest codeword (EMA codebook), b-bit index packing."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        s = spec.settings
        self.size, self.seed = spec.size, spec.seed
        self.proj_in = nn.Linear(self.dim, self.dim)
        self.gamma_in = nn.Parameter(torch.zeros(()))
        # imported here, not with the module: the config imports every codec module to read
        # its declaration, and vector-quantize-pytorch takes seconds to import
        from vector_quantize_pytorch import VectorQuantize

        self.vq = VectorQuantize(
            dim=self.dim, codebook_size=self.size, decay=s.ema_decay, eps=EPS, commitment_weight=s.beta,
            kmeans_init=True, kmeans_iters=s.kmeans_iters, sync_kmeans=False, sync_codebook=False,
            rotation_trick=False, directional_reparam=False, straight_through=False,
            stochastic_sample_codes=False, use_cosine_sim=False, learnable_codebook=False,
            ema_update=True, manual_ema_update=True, threshold_ema_dead_code=0,
        )

    @property
    def initialised(self) -> bool:
        return bool(self.vq._codebook.initted)

    @property
    def codebook(self) -> torch.Tensor:  # (K, D)
        return self.vq.codebook.detach()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """DLP in: ``x + tanh(gamma_in) * Linear_in(x)``."""
        return x + torch.tanh(self.gamma_in) * self.proj_in(x)

    @torch.no_grad()
    def init_codebook(self, x: torch.Tensor, seed: int | None = None) -> bool:
        """k-means init on ``project(x)`` (B,N,D); once only. Returns whether it ran.

        Uses a forked RNG seeded with ``seed`` (default: the codec's), so the result
        depends on ``x`` and the seed only and the global RNG is untouched."""
        if self.initialised:
            return False
        z = self.project(x)
        with torch.random.fork_rng(devices=[z.device] if z.is_cuda else []):
            torch.manual_seed(self.seed if seed is None else seed)
            self.vq(z, freeze_codebook=True)  # the library runs k-means on its first call
        return True

    def init_from(self, x: torch.Tensor) -> None:
        self.init_codebook(x)

    def forward(self, x: torch.Tensor) -> Encoded:  # (B,N,D) -> Encoded
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"vq expects (B, N, {self.dim}) features, got {tuple(x.shape)}")
        if not self.initialised:
            raise RuntimeError("vq codebook is not initialised: call init_codebook(features) or load a state")
        z = self.project(x)
        _, index, loss = self.vq(z, freeze_codebook=True)  # codebook untouched here
        if self.training and torch.is_grad_enabled():
            self.vq.update_indices(z.detach(), index)  # EMA statistics only, embed unchanged
        y = straight_through(lookup(self.codebook, index), z)
        aux = loss if self.training else z.new_zeros(())  # beta * mse(z, sg(e_i)); 0 in eval
        return Encoded(y=y, codes=index, aux_loss=aux)

    @torch.no_grad()
    def fold_ema(self) -> None:
        """Refresh the codebook from the local EMA statistics (single-client use)."""
        self.vq._codebook.embed.copy_(fold_ema(self.state_dict())[EMBED])

    def pack(self, enc: Encoded) -> Payload:
        codes = enc.codes.detach().cpu().numpy()
        return Payload(codes={"index": pack_bits(codes, self.bits)}, ideal_bits=codes.size * math.log2(self.size))


class VQServer(ServerCodec):
    """Server half: unpack indices, look up the synced codebook, DLP out."""

    def __init__(self, spec: Codec) -> None:
        super().__init__(spec)
        self.size = spec.size
        self.proj_out = nn.Linear(self.dim, self.dim)
        self.gamma_out = nn.Parameter(torch.zeros(()))
        self.register_buffer("codebook", torch.zeros(self.size, self.dim))
        self.register_buffer("loaded", torch.tensor(False))

    @torch.no_grad()
    def load_codebook(self, codebook: torch.Tensor) -> None:
        """Install the clients' ``(K, D)`` codebook (see :func:`codebook_from_state`)."""
        got = tuple(getattr(codebook, "shape", ()))
        if not isinstance(codebook, torch.Tensor) or got != (self.size, self.dim):
            raise ValueError(f"vq codebook must have shape ({self.size}, {self.dim}), got {got}")
        if not codebook.is_floating_point() or not torch.isfinite(codebook).all():
            raise ValueError("vq codebook must be finite floating point")
        self.codebook.copy_(codebook)
        self.loaded.fill_(True)

    def unpack(self, payload: Payload, shape: tuple[int, int, int]) -> torch.Tensor:
        if not bool(self.loaded):
            raise RuntimeError("vq server has no codebook: call load_codebook() first")
        return super().unpack(payload, shape)

    def decode(self, arrays: dict[str, np.ndarray], shape: tuple[int, int, int]) -> torch.Tensor:
        count = shape[0] * shape[1]
        index = unpack_codes(arrays["codes.index"], self.bits, count)
        if count and int(index.max()) >= self.size:
            raise PayloadError(f"vq index {int(index.max())} >= codebook size {self.size}")
        return lookup(self.codebook, torch.from_numpy(index).to(self.codebook.device)).reshape(shape)

    def load_synced(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        self.load_codebook(codebook_from_state(state, prefix))

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        """DLP out: ``y_hat + tanh(gamma_out) * Linear_out(y_hat)``."""
        return y_hat + torch.tanh(self.gamma_out) * self.proj_out(y_hat)


class VQ(Codec):
    """AlignedVQ: one b-bit codebook index per token (``bits`` counts per token)."""

    name = "vq"
    summary = "AlignedVQ (LLaVA-AlignedVQ): dual linear projection, EMA k-means codebook of 2^b codes, one index per token"
    streams = frozenset({"image"})
    bit_range = (1, 16)
    bit_unit = "token"
    integer_codes = True
    Settings = VQSettings
    # AlignedVQ quantises after LayerNorm 1 of ViT block 0 and rebuilds the residual from the codes
    sweep = {"split-point": "vit-ln1:0", "residual-mode": "rebuild"}
    Client, Server = VQClient, VQServer
    synced_buffers = CODEBOOK_BUFFERS
    init_flag = INITTED

    def __init__(self, dim: int, bits: int, settings: VQSettings | None = None, seed: int = 0,
                 codebook_size: int | None = None) -> None:
        super().__init__(dim, bits, settings, seed)
        self.size = _codebook_size(bits, codebook_size)

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return {"codes.index": WireArray("uint8", packed_nbytes(rows_of(shape), self.bits))}

    def index_layout(self, shape: tuple[int, ...]) -> IndexLayout:
        return rows_of(shape), self.bits, self.size

    def fold_synced(self, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        return fold_ema(state, prefix)


CODEC = VQ
