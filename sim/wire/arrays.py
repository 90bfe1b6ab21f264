"""Arrays in Flower records, and the bytes of a message.

Every array is a plain numpy array in an ``ArrayRecord`` (one array per tensor, so
Flower's ~128-byte framing per array stays negligible); scalars travel in a
``ConfigRecord`` named ``meta`` (docs/protocol.md). A stream's micro-batch payloads are
concatenated per array name (:func:`encode_stream`) and split back by the codec's exact
layout (:func:`decode_stream`). Receivers validate everything before use and raise
:class:`WireError` with the reason.

Tensors (weights, optimiser and codec state) go through :func:`state_record` /
:func:`record_state`: Flower's ``Array.from_torch_tensor`` converts through numpy, which has
no bfloat16, so a bf16 tensor travels as the ``.npy`` bytes of its 16-bit patterns (a
``uint16`` view) in an ``Array`` that declares dtype ``bfloat16``; every other dtype is
exactly what Flower would write.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from sim.compress import IndexLayout, Payload, PayloadError, ServerCodec
from sim.compress.entropy_coding import unwrap_index, wrap_index

BF16 = "bfloat16"  # the declared dtype of a bf16 tensor's Array (its data: uint16 .npy bytes)


class WireError(ValueError):
    """A record that violates the protocol schema."""


def itemsize(dtype: str) -> int:
    """Bytes per element of an Array's declared dtype (numpy's, or 2 for :data:`BF16`)."""
    return 2 if dtype == BF16 else np.dtype(dtype).itemsize


# ----------------------------------------------------------------------------- sizes
def wire_bytes(message: Message) -> int:
    """Bytes Flower serialises for ``message``: every object of its tree, deflated."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(content: RecordDict, info_records: tuple[str, ...]) -> int:
    """Information content: the raw element bytes of the arrays in ``info_records``."""
    total = 0
    for name in info_records:
        if name in content.array_records:
            for a in content.array_records[name].values():
                total += itemsize(a.dtype) * int(np.prod(a.shape, dtype=np.int64))
    return total


# ----------------------------------------------------------------------------- arrays
def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def tensor_array(t: torch.Tensor) -> Array:
    """A tensor as a Flower ``Array``, from the CPU; bf16 as its bit patterns (module docstring)."""
    t = t.detach().cpu()
    if t.dtype != torch.bfloat16:
        return Array.from_numpy_ndarray(t.numpy())
    bits = Array.from_numpy_ndarray(t.contiguous().view(torch.int16).numpy().view(np.uint16))
    return Array(dtype=BF16, shape=tuple(bits.shape), stype=bits.stype, data=bits.data)


def array_tensor(a: Array) -> torch.Tensor:
    """Inverse of :func:`tensor_array` (the same as Flower's ``to_torch_state_dict`` for numpy dtypes)."""
    try:
        v = a.numpy()
    except (ValueError, TypeError) as err:
        raise WireError(f"undecodable array: {err}") from None
    if a.dtype != BF16:
        return torch.from_numpy(v)
    if v.dtype != np.uint16:
        raise WireError(f"a {BF16} array must hold uint16 bit patterns, got {v.dtype}")
    return torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)


def state_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ``ArrayRecord`` (``ArrayRecord.from_torch_state_dict``, bf16 included)."""
    return ArrayRecord({k: tensor_array(v) for k, v in state.items()})


def record_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_record` (``ArrayRecord.to_torch_state_dict``, bf16 included)."""
    return {k: array_tensor(v) for k, v in record.items()}


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The numpy arrays of a record; an array whose ``.npy`` bytes disagree with its
    declared dtype or shape (which ``Array.numpy`` does not check) is a WireError."""
    out = {}
    for k, v in record.items():
        try:
            a = v.numpy()
        except (ValueError, TypeError) as err:
            raise WireError(f"undecodable array: {err}") from None
        if str(a.dtype) != v.dtype or tuple(a.shape) != tuple(v.shape):
            raise WireError(f"array '{k}' declares {v.dtype} {tuple(v.shape)} but holds {a.dtype} {a.shape}")
        out[k] = a
    return out


def concat_payloads(payloads: list[Payload]) -> Payload:
    """Micro-batch payloads (equal shapes) concatenated into one array per name."""
    first = payloads[0]
    return Payload(
        codes={k: np.concatenate([p.codes[k] for p in payloads]) for k in first.codes},
        side={k: np.concatenate([p.side[k] for p in payloads]) for k in first.side},
        ideal_bits=sum(p.ideal_bits for p in payloads),
    )


def split_sized(arrays: dict[str, np.ndarray], sizes: list[dict[str, int]]) -> list[Payload]:
    """Split concatenated micro-batch arrays by each part's exact element counts
    (``ServerCodec.array_sizes``); any missing, extra or mis-sized array is a WireError."""
    expected = set(sizes[0]) if sizes else set()
    if set(arrays) != expected:
        raise WireError(f"payload arrays {sorted(arrays)}, expected {sorted(expected)}")
    out: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    for k, a in arrays.items():
        counts = [int(part[k]) for part in sizes]
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.size != sum(counts):
            raise WireError(f"array '{k}' of shape {getattr(a, 'shape', None)} does not hold {sum(counts)} elements")
        for i, chunk in enumerate(np.split(a, np.cumsum(counts)[:-1])):
            out[i][k] = chunk
    try:
        return [Payload.from_arrays(d) for d in out]
    except PayloadError as err:
        raise WireError(str(err)) from None


def encode_stream(payloads: list[Payload], layouts: list[IndexLayout | None], entropy: str) -> dict[str, np.ndarray]:
    """One uplink stream of a message: the micro-batch payloads concatenated per array name;
    with ``entropy-coding`` ``ans``/``zstd`` the integer codes of all of them become one
    entropy-coded stream (:func:`sim.compress.entropy_coding.wrap_index`)."""
    arrays = concat_payloads(payloads).arrays()
    if entropy != "none" and layouts and layouts[0] is not None:
        arrays = wrap_index(arrays, list(layouts), entropy)
    return arrays


def decode_stream(
    arrays: dict[str, np.ndarray], codec: ServerCodec, shapes: list[tuple[int, int, int]], entropy: str, name: str
) -> list[torch.Tensor]:
    """Inverse of :func:`encode_stream` followed by the codec's ``unpack``: one decoded
    tensor per micro-batch of ``shapes``; every failure is a WireError naming ``name``."""
    layouts = [codec.index_layout(s) for s in shapes]
    try:
        if entropy != "none" and layouts and layouts[0] is not None:
            arrays = unwrap_index(arrays, layouts, entropy)
        parts = split_sized(arrays, [codec.array_sizes(s) for s in shapes])
        return [codec.unpack(p, s) for p, s in zip(parts, shapes)]
    except (PayloadError, WireError) as err:
        raise WireError(f"{name}: {err}") from None


def meta_int(meta: ConfigRecord, key: str, lo: int, hi: int) -> int:
    if key not in meta:
        raise WireError(f"meta is missing '{key}'")
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise WireError(f"meta '{key}'={v!r} is not an integer in [{lo}, {hi}]")
    return v
