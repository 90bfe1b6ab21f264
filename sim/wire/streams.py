"""Uplink streams and their gradients as Flower records.

A micro-batch goes up as one payload per active stream (:class:`sim.compress.streams.Streams`),
and its gradients come down the same way::

    stream     uplink record        downlink record    per-micro-batch shape
    image      features             grads              (B, N, D)   codes at the split point
    residual   residual-features    residual-grads     (B, N, Dv)  vit-ln1:k, residual-mode=transmit
    text       text-features        text-grads         (1, L, D)   text-mode=quantized; L = its tokens

Each uplink record holds the stream's micro-batch payloads concatenated per array name
(entropy-coded as one symbol stream per record when ``entropy-coding`` is on and the
stream's codec has integer codes); the receiver splits them by the codec's exact layout.
Each downlink record holds the stream's gradients of all micro-batches in one tensor
(:func:`grad_shape`: ``(samples, N, D)``, or rows of ``D`` for the text stream),
compressed with ``grad-compressor`` at ``grad-bits`` (entropy-coded with
``grad-entropy-coding``; error feedback, ``grad-error-feedback``, on the server).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from sim.compress import ClientCodec, Payload, PayloadError, ServerCodec
from sim.compress.entropy_coding import unwrap_index, wrap_index
from sim.compress.error_feedback import ErrorFeedback
from sim.compress.streams import Streams
from sim.config import SplitConfig, active_streams
from sim.model import image_token_count, stream_width

from .arrays import WireError, arrays_to_record, decode_stream, encode_stream, record_to_arrays

FEATURE_RECORDS = {"image": "features", "residual": "residual-features", "text": "text-features"}
GRAD_RECORDS = {"image": "grads", "residual": "residual-grads", "text": "text-grads"}

Shape = tuple[int, int, int]


def micro_batch_shapes(cfg: SplitConfig, text_tokens: list[int] | None = None, count: int = 1) -> Streams[list[Shape]]:
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
    return Streams.of(out)


def payload_records(
    cfg: SplitConfig, codecs: Streams[ClientCodec], payloads: list[Streams[Payload]], shapes: Streams[list[Shape]]
) -> dict[str, ArrayRecord]:
    """The uplink records of some micro-batches (``payloads[i]`` is micro-batch ``i``'s)."""
    per_stream = Streams.zip(payloads)
    out = {}
    for s, codec in codecs.items():
        layouts = [codec.index_layout(shape) for shape in shapes[s]]
        out[FEATURE_RECORDS[s]] = arrays_to_record(encode_stream(per_stream[s], layouts, cfg.entropy(s)))
    return out


def decode_payload_records(
    content: RecordDict, cfg: SplitConfig, codecs: Streams[ServerCodec], shapes: Streams[list[Shape]]
) -> list[Streams[torch.Tensor]]:
    """Validate and decode every stream: one bundle of ``y_hat`` per micro-batch."""
    if codecs.names() != shapes.names():
        raise WireError(f"the server decodes streams {codecs.names()} but the run sends {shapes.names()}")
    decoded = {}
    for s, codec in codecs.items():
        name = FEATURE_RECORDS[s]
        if name not in content.array_records:
            raise WireError(f"missing record '{name}'")
        decoded[s] = decode_stream(record_to_arrays(content.array_records[name]), codec, shapes[s], cfg.entropy(s), name)
    count = len(shapes.image)
    return [Streams.of({s: decoded[s][i] for s in decoded}) for i in range(count)]


def grad_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape a stream's gradients of some micro-batches travel in: ``(samples, N, D)``
    when every micro-batch is ``(B, N, D)`` with the same ``(N, D)`` (the image and
    residual streams: a codec sees each sample's ``N x D`` matrix), else ``(rows, D)``
    (the text stream, whose micro-batches differ in length). Codecs that work per row
    (``none``, ``fp16``, ``topk``, ``nf``) encode both alike."""
    if not shapes:
        raise WireError("no micro-batch shapes")
    if all(len(x) == 3 for x in shapes) and len({tuple(x[1:]) for x in shapes}) == 1:
        return (sum(int(x[0]) for x in shapes), *(int(v) for v in shapes[0][1:]))
    return (sum(int(np.prod(x[:-1])) for x in shapes), int(shapes[0][-1]))


def grad_records(
    cfg: SplitConfig, grads: list[Streams[torch.Tensor]], feedback: ErrorFeedback | None = None
) -> dict[str, ArrayRecord]:
    """The downlink gradient records of some micro-batches (one bundle per micro-batch).

    With ``feedback`` (``grad-error-feedback``, one client's residuals) the residual is
    added before compression and replaced by what this message fails to deliver; with
    ``grad-entropy-coding`` the codec's integer codes become one ANS or zstd stream."""
    codec = cfg.grad_codec()
    out = {}
    for s, gs in Streams.zip(grads).items():
        shape = grad_shape([tuple(g.shape) for g in gs])
        g = torch.cat([x.reshape(-1, *shape[1:]) for x in gs])
        if feedback is not None:
            g = feedback.corrected(s, g)
        arrays = codec.encode_gradient(g)
        if feedback is not None:
            feedback.update(s, g, codec.decode_gradient(arrays, shape))
        if cfg.grad_entropy_coding != "none":
            arrays = wrap_index(arrays, [codec.gradient_index_layout(shape)], cfg.grad_entropy_coding)
        out[GRAD_RECORDS[s]] = arrays_to_record(arrays)
    return out


def decode_grad_records(content: RecordDict, cfg: SplitConfig, shapes: Streams[list[Shape]]) -> list[Streams[torch.Tensor]]:
    """Validate and decode the downlink gradients: one bundle per micro-batch of ``shapes``."""
    out: dict[str, list[torch.Tensor]] = {}
    codec = cfg.grad_codec()
    for s, sh in shapes.items():
        name = GRAD_RECORDS[s]
        if name not in content.array_records:
            raise WireError(f"missing record '{name}'")
        rows = [int(np.prod(x[:-1])) for x in sh]
        shape = grad_shape(sh)
        try:
            arrays = record_to_arrays(content.array_records[name])
            if cfg.grad_entropy_coding != "none":
                arrays = unwrap_index(arrays, [codec.gradient_index_layout(shape)], cfg.grad_entropy_coding)
            g = codec.decode_gradient(arrays, shape)
        except PayloadError as err:
            raise WireError(f"{name}: {err}") from None
        if not torch.isfinite(g).all():
            raise WireError(f"{name} contain NaN or inf")
        out[s] = [part.reshape(x) for part, x in zip(g.reshape(-1, shape[-1]).split(rows), sh)]
    return [Streams.of({s: out[s][i] for s in out}) for i in range(len(shapes.image))]


def split_prompt_stream(ups: list[Streams[torch.Tensor]], prompt_lens: list[int]) -> tuple[list[Streams[torch.Tensor]], list[torch.Tensor]]:
    """Evaluation with ``text-mode=quantized``: take the text stream out of each decoded
    micro-batch and cut it into one (len, D) decoded prompt per sample."""
    flat = torch.cat([u.text[0] for u in ups])
    if flat.shape[0] != sum(prompt_lens):
        raise WireError(f"{flat.shape[0]} decoded prompt tokens for prompts of {sum(prompt_lens)} tokens")
    rest = [Streams(u.image, u.residual) for u in ups]
    return rest, list(flat.split([int(n) for n in prompt_lens]))
