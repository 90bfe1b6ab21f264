"""Text on the wire: token ids, lengths and packed loss masks (docs/protocol.md).

Token ids travel as one flat uint16 array (uint32 for vocabularies over 65 536) plus
uint16 lengths; the loss mask (which tokens are answers) as 1 bit per token. With
``text-mode=quantized`` only the answer tokens' ids (the labels) go up in clear. Every
decoder checks sizes and ranges and raises :class:`~sim.wire.arrays.WireError`.
"""

from __future__ import annotations

import numpy as np

from sim.compress import PackError, pack_bits, unpack_bits
from sim.data.batches import TextBatch, pad_text

from .arrays import WireError


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


def split_train_text(
    arrays, meta, steps: int, batch: int, vocab_size: int, pad_id: int, labels_only: bool = False
) -> list[TextBatch]:
    """The text record of a training reply, cut into one :class:`TextBatch` per micro-batch
    (``meta.mask-bytes`` gives each micro-batch's share of the packed loss mask)."""
    mask_bytes = meta.get("mask-bytes")
    if not isinstance(mask_bytes, list) or len(mask_bytes) != steps:
        raise WireError("meta 'mask-bytes' must list one size per micro-batch")
    if labels_only:
        return split_label_text(arrays, mask_bytes, steps, batch, vocab_size, pad_id)
    ids, lens, mask = arrays.get("ids"), arrays.get("lens"), arrays.get("mask")
    if ids is None or lens is None or mask is None:
        raise WireError("text record needs 'ids', 'lens' and 'mask'")
    if lens.ndim != 1 or lens.size != steps * batch or ids.ndim != 1 or mask.ndim != 1:
        raise WireError(f"text 'lens' must have {steps * batch} entries")
    if sum(int(m) for m in mask_bytes) != mask.size or any(int(m) < 0 for m in mask_bytes):
        raise WireError("meta 'mask-bytes' does not match the mask array")
    id_ends = np.cumsum(lens.astype(np.int64).reshape(steps, batch).sum(1))
    if id_ends[-1] != ids.size:
        raise WireError(f"text 'lens' sum to {int(id_ends[-1])} but there are {ids.size} ids")
    out = []
    m_ends = np.cumsum([int(m) for m in mask_bytes])
    for s in range(steps):
        i0 = 0 if s == 0 else int(id_ends[s - 1])
        j0 = 0 if s == 0 else int(m_ends[s - 1])
        part = {
            "ids": ids[i0 : int(id_ends[s])], "lens": lens[s * batch : (s + 1) * batch],
            "mask": mask[j0 : int(m_ends[s])],
        }
        out.append(decode_train_text(part, batch, vocab_size, pad_id))
    return out


def split_label_text(arrays, mask_bytes: list, steps: int, batch: int, vocab_size: int, pad_id: int) -> list[TextBatch]:
    """``text-mode=quantized``: split labels/lens/mask into micro-batches (labels by the
    number of answer positions each micro-batch's mask selects)."""
    labels, lens, mask = arrays.get("labels"), arrays.get("lens"), arrays.get("mask")
    if labels is None or lens is None or mask is None:
        raise WireError("text record needs 'labels', 'lens' and 'mask'")
    if lens.ndim != 1 or lens.size != steps * batch or labels.ndim != 1 or mask.ndim != 1:
        raise WireError(f"text 'lens' must have {steps * batch} entries")
    sizes = [int(m) for m in mask_bytes]
    if any(m < 0 for m in sizes) or sum(sizes) != mask.size:
        raise WireError("meta 'mask-bytes' does not match the mask array")
    out, j0, l0 = [], 0, 0
    for s in range(steps):
        part_lens = lens[s * batch : (s + 1) * batch]
        part_mask = mask[j0 : j0 + sizes[s]]
        n = int(part_lens.astype(np.int64).sum())
        if part_mask.size * 8 < n:
            raise WireError(f"micro-batch {s}: the mask has {part_mask.size * 8} bits for {n} tokens")
        picked = int(np.unpackbits(part_mask, count=n, bitorder="little").sum())
        part = {"labels": labels[l0 : l0 + picked], "lens": part_lens, "mask": part_mask}
        out.append(decode_label_text(part, batch, vocab_size, pad_id))
        j0, l0 = j0 + sizes[s], l0 + picked
    if l0 != labels.size:
        raise WireError(f"text has {labels.size} labels, the masks select {l0}")
    return out


def text_token_counts(lens: np.ndarray, batch: int) -> list[int]:
    """Tokens per micro-batch of ``batch`` samples given per-sample lengths (last may be short)."""
    lens = np.asarray(lens, dtype=np.int64)
    return [int(lens[i : i + batch].sum()) for i in range(0, len(lens), batch)]
