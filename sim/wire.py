"""Wire schema: what crosses between ClientApp and ServerApp, as Flower records.

The schema is documented in ``docs/protocol.md``. Every array is a plain numpy array
in an ``ArrayRecord`` (one array per tensor, so Flower's ~128-byte framing per array
stays negligible); scalars travel in a ``ConfigRecord`` named ``meta``. Receivers
validate everything before use and raise :class:`WireError` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from .batches import TextBatch, pad_text
from .compress import IndexLayout, Payload, PayloadError, ServerCodec, pack_bits, unpack_bits
from .compress.entropy_coding import unwrap_index, wrap_index
from .compress.grad_codec import decode_grads, encode_grads
from .compress.packing import PackError, packed_nbytes


class WireError(ValueError):
    """A record that violates the protocol schema."""


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
                total += np.dtype(a.dtype).itemsize * int(np.prod(a.shape, dtype=np.int64))
    return total


# ----------------------------------------------------------------------------- arrays
def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    try:
        return {k: v.numpy() for k, v in record.items()}
    except (ValueError, TypeError) as err:
        raise WireError(f"undecodable array: {err}") from None


def concat_payloads(payloads: list[Payload]) -> Payload:
    """Micro-batch payloads (equal shapes) concatenated into one array per name."""
    first = payloads[0]
    return Payload(
        codes={k: np.concatenate([p.codes[k] for p in payloads]) for k in first.codes},
        side={k: np.concatenate([p.side[k] for p in payloads]) for k in first.side},
        ideal_bits=sum(p.ideal_bits for p in payloads),
    )


def split_payload(arrays: dict[str, np.ndarray], parts: int) -> list[Payload]:
    """Inverse of :func:`concat_payloads` on the receiving side."""
    out: list[dict[str, np.ndarray]] = [{} for _ in range(parts)]
    for k, a in arrays.items():
        if a.ndim != 1 or a.size % parts:
            raise WireError(f"array '{k}' of shape {a.shape} does not split into {parts} micro-batches")
        for i, chunk in enumerate(np.split(a, parts)):
            out[i][k] = chunk
    try:
        return [Payload.from_arrays(d) for d in out]
    except PayloadError as err:
        raise WireError(str(err)) from None


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


# ----------------------------------------------------------------------------- text
def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_ragged(seqs: list[np.ndarray], vocab_size: int, prefix: str) -> dict[str, np.ndarray]:
    """Token id sequences as one flat id array plus uint16 lengths."""
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return {
        f"{prefix}ids": flat.astype(id_dtype(vocab_size)),
        f"{prefix}lens": np.asarray([len(s) for s in seqs], dtype=np.uint16),
    }


def decode_ragged(arrays: dict[str, np.ndarray], prefix: str, count: int, vocab_size: int) -> list[np.ndarray]:
    ids, lens = _get(arrays, f"{prefix}ids", id_dtype(vocab_size)), _get(arrays, f"{prefix}lens", np.uint16)
    if lens.size != count:
        raise WireError(f"'{prefix}lens' has {lens.size} entries, expected {count}")
    if int(lens.sum(dtype=np.int64)) != ids.size:
        raise WireError(f"'{prefix}lens' sums to {int(lens.sum())} but there are {ids.size} ids")
    if ids.size and int(ids.max()) >= vocab_size:
        raise WireError(f"token id {int(ids.max())} out of range for vocabulary of {vocab_size}")
    return np.split(ids.astype(np.int64), np.cumsum(lens.astype(np.int64))[:-1]) if count else []


def encode_train_text(text: TextBatch, vocab_size: int) -> dict[str, np.ndarray]:
    seqs = [text.ids[i, : int(n)].numpy() for i, n in enumerate(text.lens)]
    mask = np.concatenate([text.loss_mask[i, : int(n)].numpy() for i, n in enumerate(text.lens)])
    out = encode_ragged(seqs, vocab_size, "")
    out["mask"] = pack_bits(mask.astype(np.uint8), 1)
    return out


def decode_train_text(arrays: dict[str, np.ndarray], count: int, vocab_size: int, pad_id: int) -> TextBatch:
    seqs = decode_ragged(arrays, "", count, vocab_size)
    if any(len(s) == 0 for s in seqs):
        raise WireError("empty text sequence")
    n = sum(len(s) for s in seqs)
    try:
        mask = unpack_bits(_get(arrays, "mask", np.uint8), 1, n).astype(bool)
    except PackError as err:
        raise WireError(f"loss mask: {err}") from None
    masks = np.split(mask, np.cumsum([len(s) for s in seqs])[:-1])
    if not any(m.any() for m in masks):
        raise WireError("loss mask selects no answer token")
    return pad_text(seqs, masks, pad_id)


def encode_label_text(text: TextBatch, vocab_size: int) -> dict[str, np.ndarray]:
    """``text-mode=quantized``: only the answer tokens' ids (the labels) go up in clear,
    with the per-sample lengths and the packed loss mask; the rest of the text travels as
    quantised embeddings in the ``text-features`` stream."""
    lens = [int(n) for n in text.lens]
    mask = np.concatenate([text.loss_mask[i, :n].numpy() for i, n in enumerate(lens)])
    ids = np.concatenate([text.ids[i, :n].numpy() for i, n in enumerate(lens)])
    return {
        "labels": ids[mask].astype(id_dtype(vocab_size)),
        "lens": np.asarray(lens, dtype=np.uint16),
        "mask": pack_bits(mask.astype(np.uint8), 1),
    }


def decode_label_text(arrays: dict[str, np.ndarray], count: int, vocab_size: int, pad_id: int) -> TextBatch:
    """Inverse of :func:`encode_label_text`: a TextBatch whose ids are ``pad_id`` except at
    the answer positions (the server never sees the other ids)."""
    labels, lens = _get(arrays, "labels", id_dtype(vocab_size)), _get(arrays, "lens", np.uint16)
    if lens.size != count or (count and int(lens.min()) == 0):
        raise WireError(f"'lens' must hold {count} non-zero lengths")
    n = int(lens.sum(dtype=np.int64))
    try:
        mask = unpack_bits(_get(arrays, "mask", np.uint8), 1, n).astype(bool)
    except PackError as err:
        raise WireError(f"loss mask: {err}") from None
    if int(mask.sum()) != labels.size:
        raise WireError(f"{labels.size} labels for {int(mask.sum())} answer positions")
    if labels.size == 0:
        raise WireError("loss mask selects no answer token")
    if int(labels.max()) >= vocab_size:
        raise WireError(f"token id {int(labels.max())} out of range for vocabulary of {vocab_size}")
    ids = np.full(n, pad_id, dtype=np.int64)
    ids[mask] = labels.astype(np.int64)
    cuts = np.cumsum(lens.astype(np.int64))[:-1]
    return pad_text(np.split(ids, cuts), np.split(mask, cuts), pad_id)


def _get(arrays: dict[str, np.ndarray], name: str, dtype) -> np.ndarray:
    if name not in arrays:
        raise WireError(f"missing array '{name}'")
    a = arrays[name]
    if a.dtype != np.dtype(dtype) or a.ndim != 1:
        raise WireError(f"array '{name}' is {a.dtype}{list(a.shape)}, expected 1-D {np.dtype(dtype)}")
    return a


# ----------------------------------------------------------------------------- meta
@dataclass(frozen=True)
class FeatureShape:
    micro_batches: int
    batch_size: int
    tokens: int
    dim: int

    @property
    def per_batch(self) -> tuple[int, int, int]:
        return (self.batch_size, self.tokens, self.dim)


def meta_int(meta: ConfigRecord, key: str, lo: int, hi: int) -> int:
    if key not in meta:
        raise WireError(f"meta is missing '{key}'")
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise WireError(f"meta '{key}'={v!r} is not an integer in [{lo}, {hi}]")
    return v


def grads_to_arrays(grads: list[torch.Tensor], cfg) -> dict[str, np.ndarray]:
    """Downlink gradients of all micro-batches, compressed with ``grad-compressor``."""
    return encode_grads(torch.stack(grads), cfg.grad_compressor, cfg.grad_bits)


def stream_grads_to_arrays(grads: list[torch.Tensor], cfg) -> dict[str, np.ndarray]:
    """Downlink gradients of a residual or text stream (any per-micro-batch shapes with a
    common last dim), flattened to rows and compressed with ``grad-compressor``."""
    return encode_grads(torch.cat([g.reshape(-1, g.shape[-1]) for g in grads]), cfg.grad_compressor, cfg.grad_bits)


def arrays_to_stream_grads(arrays: dict[str, np.ndarray], shapes: list[tuple[int, ...]], cfg, name: str) -> list[torch.Tensor]:
    """Inverse of :func:`stream_grads_to_arrays` for micro-batches of ``shapes``."""
    dim = shapes[0][-1]
    rows = [int(np.prod(s[:-1])) for s in shapes]
    try:
        g = decode_grads(arrays, (sum(rows), dim), cfg.grad_compressor, cfg.grad_bits)
    except PayloadError as err:
        raise WireError(f"{name}: {err}") from None
    if not torch.isfinite(g).all():
        raise WireError(f"{name} contain NaN or inf")
    return [part.reshape(s) for part, s in zip(g.split(rows), shapes)]


def arrays_to_grads(arrays: dict[str, np.ndarray], shape: FeatureShape, cfg) -> list[torch.Tensor]:
    """Validate and decode downlink gradients into one tensor per micro-batch."""
    try:
        g = decode_grads(arrays, (shape.micro_batches, *shape.per_batch), cfg.grad_compressor, cfg.grad_bits)
    except PayloadError as err:
        raise WireError(f"gradients: {err}") from None
    if not torch.isfinite(g).all():
        raise WireError("gradients contain NaN or inf")
    return list(g.unbind(0))


__all__ = [
    "FeatureShape", "WireError", "arrays_to_grads", "arrays_to_record", "arrays_to_stream_grads", "concat_payloads",
    "decode_label_text", "decode_ragged", "decode_stream", "decode_train_text", "encode_label_text", "encode_ragged", "encode_stream", "encode_train_text",
    "grads_to_arrays", "meta_int", "payload_bytes", "packed_nbytes", "record_to_arrays", "split_payload",
    "split_sized", "stream_grads_to_arrays", "wire_bytes",
]
