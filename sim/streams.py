"""Uplink streams and their Flower records.

A micro-batch goes up as one payload per active stream (:func:`sim.model.active_streams`),
and its gradients come down the same way::

    stream     uplink record        downlink record    per-micro-batch shape
    image      features             grads              (B, N, D)   codes at the split point
    residual   residual-features    residual-grads     (B, N, Dv)  vit-ln1:k, residual-mode=transmit
    text       text-features        text-grads         (1, L, D)   text-mode=quantized; L = its tokens

Each uplink record holds the stream's micro-batch payloads concatenated per array name
(entropy-coded as one symbol stream per record when ``entropy-coding`` is on and the
stream's codec has integer codes); the receiver splits them by the codec's exact
per-shape array sizes. Gradients use ``grad-compressor``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from .compress import ClientCodec, Payload, ServerCodec
from .config import SplitConfig
from .model import active_streams, image_token_count, stream_width
from .wire import (
    FeatureShape, WireError, arrays_to_grads, arrays_to_record, arrays_to_stream_grads, decode_stream, encode_stream,
    grads_to_arrays, record_to_arrays, stream_grads_to_arrays,
)

FEATURE_RECORDS = {"image": "features", "residual": "residual-features", "text": "text-features"}
GRAD_RECORDS = {"image": "grads", "residual": "residual-grads", "text": "text-grads"}

Shape = tuple[int, int, int]


def micro_batch_shapes(cfg: SplitConfig, text_tokens: list[int] | None = None, count: int = 1) -> dict[str, list[Shape]]:
    """Per active stream, the shape of each of ``count`` micro-batches; the text stream's
    token counts come from ``text_tokens`` (one per micro-batch)."""
    out: dict[str, list[Shape]] = {}
    for s in active_streams(cfg):
        if s == "text":
            if text_tokens is None or len(text_tokens) != count:
                raise WireError(f"the text stream needs one token count per micro-batch ({count})")
            out[s] = [(1, int(n), stream_width(cfg, s)) for n in text_tokens]
        else:
            out[s] = [(cfg.batch_size, image_token_count(cfg), stream_width(cfg, s))] * count
    return out


def _entropy(cfg: SplitConfig, stream: str) -> str:
    return cfg.stream_config(stream).entropy_coding


def payload_records(
    cfg: SplitConfig, codecs: dict[str, ClientCodec], payloads: list[dict[str, Payload]], shapes: dict[str, list[Shape]]
) -> dict[str, ArrayRecord]:
    """The uplink records of some micro-batches (``payloads[i][stream]``)."""
    out = {}
    for s, codec in codecs.items():
        layouts = [codec.index_layout(shape) for shape in shapes[s]]
        arrays = encode_stream([p[s] for p in payloads], layouts, _entropy(cfg, s))
        out[FEATURE_RECORDS[s]] = arrays_to_record(arrays)
    return out


def decode_payload_records(
    content: RecordDict, cfg: SplitConfig, codecs: dict[str, ServerCodec], shapes: dict[str, list[Shape]]
) -> list[dict[str, torch.Tensor]]:
    """Validate and decode every stream: one ``{stream: y_hat}`` per micro-batch."""
    decoded = {}
    for s, codec in codecs.items():
        name = FEATURE_RECORDS[s]
        if name not in content.array_records:
            raise WireError(f"missing record '{name}'")
        decoded[s] = decode_stream(record_to_arrays(content.array_records[name]), codec, shapes[s], _entropy(cfg, s), name)
    count = len(next(iter(shapes.values())))
    return [{s: decoded[s][i] for s in codecs} for i in range(count)]


def grad_records(cfg: SplitConfig, grads: list[dict[str, torch.Tensor] | torch.Tensor]) -> dict[str, ArrayRecord]:
    """The downlink gradient records of some micro-batches (a bare tensor is the image's)."""
    per = [g if isinstance(g, dict) else {"image": g} for g in grads]
    out = {GRAD_RECORDS["image"]: arrays_to_record(grads_to_arrays([g["image"] for g in per], cfg))}
    for s in per[0]:
        if s != "image":
            out[GRAD_RECORDS[s]] = arrays_to_record(stream_grads_to_arrays([g[s] for g in per], cfg))
    return out


def decode_grad_records(content: RecordDict, cfg: SplitConfig, shapes: dict[str, list[Shape]]) -> list:
    """Validate and decode the downlink gradients: per micro-batch a tensor (image only)
    or ``{stream: tensor}``."""
    for s in shapes:
        if GRAD_RECORDS[s] not in content.array_records:
            raise WireError(f"missing record '{GRAD_RECORDS[s]}'")
    img = shapes["image"]
    fs = FeatureShape(len(img), *img[0])
    out = {"image": arrays_to_grads(record_to_arrays(content.array_records[GRAD_RECORDS["image"]]), fs, cfg)}
    for s, sh in shapes.items():
        if s != "image":
            out[s] = arrays_to_stream_grads(record_to_arrays(content.array_records[GRAD_RECORDS[s]]), sh, cfg, GRAD_RECORDS[s])
    if len(shapes) == 1:
        return out["image"]
    return [{s: out[s][i] for s in shapes} for i in range(len(img))]


def text_token_counts(lens: np.ndarray, batch: int) -> list[int]:
    """Tokens per micro-batch of ``batch`` samples given per-sample lengths (last may be short)."""
    lens = np.asarray(lens, dtype=np.int64)
    return [int(lens[i : i + batch].sum()) for i in range(0, len(lens), batch)]


def split_prompt_stream(ups: list[dict[str, torch.Tensor]], prompt_lens: list[int]) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Evaluation with ``text-mode=quantized``: take the text stream out of each decoded
    micro-batch and cut it into one (len, D) decoded prompt per sample."""
    flat = torch.cat([u["text"][0] for u in ups])
    if flat.shape[0] != sum(prompt_lens):
        raise WireError(f"{flat.shape[0]} decoded prompt tokens for prompts of {sum(prompt_lens)} tokens")
    rest = [{k: v for k, v in u.items() if k != "text"} for u in ups]
    return rest, list(flat.split([int(n) for n in prompt_lens]))
