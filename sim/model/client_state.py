"""The client state: what FedAvg averages, the wire carries and the server folds each round.

It is the client half's trainable parameters plus its codecs' round-synchronised buffers
(AlignedVQ's EMA codebook, RD-FSQ's EMA statistics), by name. A codec's buffers sit under
its stream's prefix (:data:`STREAM_PREFIX`); what each codec syncs, folds and initialises
is declared by its :class:`~sim.compress.base.Codec` definition, the same object both
halves hold, so the server needs no client module to fold or check the state.
"""

from __future__ import annotations

import torch

from sim.compress import Codec
from sim.compress.streams import Streams

from .halves import ClientModel, ServerModel

STREAM_PREFIX = {"image": "codec.", "residual": "residual_codec.", "text": "text_codec."}


def client_state_names(model: ClientModel) -> list[str]:
    """The trainable parameters, then every codec's synced buffers."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for stream, codec in model.codecs().items():
        names += [STREAM_PREFIX[stream] + b for b in codec.synced_buffers]
    return names


def synced_names(model: ClientModel) -> list[str]:
    """The part of the client state that is codec state, not trained weights."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return sorted(set(client_state_names(model)) - trained)


def client_state(model: ClientModel) -> dict[str, torch.Tensor]:
    """The client state by name (detached copies), see :func:`client_state_names`."""
    full = dict(model.named_parameters())
    full.update(dict(model.named_buffers()))
    return {n: full[n].detach().clone() for n in client_state_names(model)}


def load_client_state(model: ClientModel, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the client state (strict: every name of :func:`client_state_names`, nothing else)."""
    names = set(client_state_names(model))
    if set(state) != names:
        missing, extra = sorted(names - set(state)), sorted(set(state) - names)
        raise ValueError(f"client weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    full = dict(model.named_parameters())
    full.update(dict(model.named_buffers()))
    with torch.no_grad():
        for n, t in state.items():
            if full[n].shape != t.shape:
                raise ValueError(f"weight {n!r} has shape {tuple(t.shape)}, expected {tuple(full[n].shape)}")
            full[n].copy_(t)


def fold_client_state(specs: Streams[Codec], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Next round's client state from the FedAvg'd one: each codec folds its synced buffers."""
    for stream, spec in specs.items():
        if spec.synced_buffers:
            state = spec.fold_synced(state, STREAM_PREFIX[stream])
    return state


def state_needs_init(specs: Streams[Codec], state: dict[str, torch.Tensor]) -> bool:
    """Whether a client state still lacks its codecs' data-dependent initialisation."""
    return any(spec.needs_init(state, STREAM_PREFIX[s]) for s, spec in specs.items() if spec.synced_buffers)


def load_server_synced(model: ServerModel, state: dict[str, torch.Tensor]) -> None:
    """Install the round-synchronised client state the server halves decode with."""
    for stream, codec in model.codecs().items():
        if codec.spec.synced_buffers:
            codec.load_synced(state, STREAM_PREFIX[stream])
