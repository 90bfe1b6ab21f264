"""The split-learning messages: builders, schemas and validating parsers, both directions.

Message types (docs/protocol.md has the full record schema):

* ``query.hello``          server -> client: who are you? reply: partition id
* ``query.init_codec``     before round 1: one client initialises the codecs' data-dependent state
* ``train.split_step``     one fused exchange: apply the gradients of the previous
                           micro-batches, encode the next ones; the first exchange of a
                           round carries the global client weights and the run config,
                           the last one asks for the updated weights back
* ``evaluate.split_infer`` global weights down; codes of the local test set up

Each message has its builder and its parser here, side by side, so the two ends cannot
drift apart. Parsers validate against the schema (:mod:`sim.wire.schema`) before any
decoder sees a byte, and raise :class:`~sim.wire.arrays.WireError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from sim.compress import ClientCodec, Payload, ServerCodec
from sim.compress.error_feedback import ErrorFeedback
from sim.compress.streams import Streams
from sim.config import SplitConfig, active_streams
from sim.data.batches import QTYPES, TextBatch
from sim.model import STREAM_PREFIX, stream_width

from .arrays import WireError, arrays_to_record, meta_int, record_state, record_to_arrays, state_record
from .schema import FLOAT, FLOATS, INT, INTS, Arrays, Expect, Key, Schema, validate
from .streams import (
    FEATURE_RECORDS, GRAD_RECORDS, decode_payload_records, grad_records, micro_batch_shapes, payload_records,
    split_prompt_stream,
)
from .text import (
    decode_ragged, encode_label_text, encode_ragged, encode_train_text, split_train_text, text_token_counts,
)

HELLO, TRAIN, EVALUATE, INIT = "query.hello", "train.split_step", "evaluate.split_infer", "query.init_codec"
UPLINK_INFO = (*FEATURE_RECORDS.values(), "text", "weights", "codec-state")  # records whose arrays are information
DOWNLINK_INFO = (*GRAD_RECORDS.values(), "weights")
MAX_STEPS = 1 << 20
# Every reply's meta ``timing-s``: where the client's time went, in seconds, in this order
# (sim/training/timing.py; docs/protocol.md, "Timing").
CLIENT_TIMING = ("start", "load", "import-torch", "import-transformers", "import-project", "rebuild", "compute")
TIMING_KEY = "timing-s"
TIMING = Key(FLOATS, 0.0, 1e7, max_len=len(CLIENT_TIMING), required=False)
MAX_EVAL_SAMPLES = 1 << 16  # per client and round; larger local test sets must be subsampled
FEATURE_DTYPES = frozenset({"uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32"})
TEXT_DTYPES = frozenset({"uint8", "uint16", "uint32"})


# ============================================================================ query.hello
def hello_request() -> RecordDict:
    return RecordDict({"meta": ConfigRecord({"kind": "hello"})})


def hello_reply(partition: int, num_partitions: int) -> RecordDict:
    return RecordDict({"meta": ConfigRecord({"partition-id": partition, "num-partitions": num_partitions})})


def hello_schema() -> Schema:
    return Schema(HELLO, {"partition-id": Key(INT, 0, 1 << 30), "num-partitions": Key(INT, 1, 1 << 30),
                          TIMING_KEY: TIMING})


# ============================================================================ query.init_codec
def init_request(cfg: SplitConfig, weights: dict[str, torch.Tensor]) -> RecordDict:
    """Run the codecs' data-dependent initialisation (AlignedVQ k-means, RD-FSQ EMA
    statistics) on the client's data, before round 1."""
    return RecordDict(
        {
            "meta": ConfigRecord({"round": 0}),
            "weights": state_record(weights),
            "config": ConfigRecord(cfg.to_run_config()),
        }
    )


def init_reply(partition: int, codec_state: dict[str, torch.Tensor]) -> RecordDict:
    """Only the initialised codec state goes back (``codec-state``)."""
    return RecordDict({
        "codec-state": state_record(codec_state),
        "meta": ConfigRecord({"partition-id": partition, "round": 0}),
    })


def init_reply_schema() -> Schema:
    """The reply to ``query.init_codec``: the initialised codec state (exact names and
    shapes are checked against the global weights through ``Expect.weights``)."""
    return Schema(INIT, {"partition-id": Key(INT, 0, 1 << 30), "round": Key(INT, 0, 0), TIMING_KEY: TIMING},
                  {"codec-state": Arrays(frozenset({"float32", "bool"}), 1 << 31, ndim=None)})


def parse_init_reply(content: RecordDict, cfg: SplitConfig, expect: Expect | None = None) -> dict[str, torch.Tensor]:
    """Validate and decode a ``query.init_codec`` reply: finite codec state (raises WireError)."""
    validate(content, init_reply_schema(), expect)
    state = record_state(content.array_records["codec-state"])
    prefixes = tuple(STREAM_PREFIX[s] for s in active_streams(cfg))
    for k, v in state.items():
        if not k.startswith(prefixes):
            raise WireError(f"codec state {k!r} belongs to no stream codec")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WireError(f"codec state {k!r} contains NaN or inf")
    return state


# ============================================================================ train.split_step
@dataclass(frozen=True)
class TrainRequest:
    """What a ``train.split_step`` request asks of a client."""

    round: int
    exchange: int
    apply: list[int]  # micro-batch steps whose gradients this message carries
    encode: list[int]  # micro-batch steps to encode next
    final: bool  # send the updated weights back
    save_state: bool  # checkpoint the optimiser state (checkpoint=true, final exchange)
    resumed_from: int  # exchange 0 after a resume: the checkpoint's round


def train_request(
    cfg: SplitConfig, rnd: int, exchange: int, apply: list[int], encode: list[int], final: bool,
    grads: list[Streams[torch.Tensor]] | None = None, weights: dict[str, torch.Tensor] | None = None,
    resumed_from: int = 0, feedback: ErrorFeedback | None = None,
) -> RecordDict:
    """``train.split_step`` request. With ``checkpoint`` on, the final exchange asks the
    client to save its optimiser state (``save-state``); after a resume the first
    exchange says from which round (``resumed-from``) so a fresh client reloads it.
    ``feedback``: the client's error-feedback residuals (``grad-error-feedback``)."""
    meta = {"round": rnd, "exchange": exchange, "apply-steps": apply, "encode-steps": encode, "final": final}
    if final and cfg.checkpoint:
        meta["save-state"] = True
    rd = RecordDict({"meta": ConfigRecord(meta)})
    if weights is not None:
        rd["weights"] = state_record(weights)
        rd["config"] = ConfigRecord(cfg.to_run_config())
        rd["meta"]["resumed-from"] = resumed_from
    if grads:
        for name, record in grad_records(cfg, grads, feedback).items():
            rd[name] = record
    return rd


def _step_list(meta: ConfigRecord, key: str) -> list[int]:
    v = meta.get(key, [])
    if not isinstance(v, list) or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < MAX_STEPS for s in v):
        raise WireError(f"meta '{key}' must be a list of step indices")
    return list(v)


def parse_train_request(content: RecordDict) -> TrainRequest:
    """The client's view of a ``train.split_step`` request (raises WireError)."""
    meta = content.config_records["meta"]
    apply = _step_list(meta, "apply-steps")
    if apply and "grads" not in content.array_records:
        raise WireError("apply-steps given without 'grads'")
    resumed = meta.get("resumed-from", 0)
    return TrainRequest(
        meta_int(meta, "round", 1, MAX_STEPS), meta_int(meta, "exchange", 0, MAX_STEPS), apply,
        _step_list(meta, "encode-steps"), bool(meta.get("final", False)), meta.get("save-state") is True,
        resumed if isinstance(resumed, int) and not isinstance(resumed, bool) and resumed > 0 else 0,
    )


def train_reply(
    cfg: SplitConfig, request: TrainRequest, partition: int, vocab_size: int, codecs: Streams[ClientCodec],
    payloads: list[Streams[Payload]], texts: list[TextBatch], aux_losses: list[float] | None,
    weights: dict[str, torch.Tensor] | None, num_examples: int,
) -> RecordDict:
    """The reply to a ``train.split_step``: the codes and text of the encoded micro-batches,
    the applied steps' auxiliary losses, and (final exchange) the updated weights."""
    meta = ConfigRecord({"partition-id": partition, "round": request.round, "exchange": request.exchange})
    reply = RecordDict({"meta": meta})
    if aux_losses is not None:
        meta["client-aux-loss"] = aux_losses
    if payloads:
        shapes = micro_batch_shapes(cfg, [int(t.lens.sum()) for t in texts], len(payloads))
        for name, record in payload_records(cfg, codecs, payloads, shapes).items():
            reply[name] = record
        quantized = cfg.text_mode == "quantized"
        text = [(encode_label_text if quantized else encode_train_text)(t, vocab_size) for t in texts]
        names = ("labels" if quantized else "ids", "lens", "mask")
        reply["text"] = arrays_to_record({k: np.concatenate([t[k] for t in text]) for k in names})
        meta["samples"] = len(payloads) * cfg.batch_size
        meta["mask-bytes"] = [int(t["mask"].size) for t in text]
    if weights is not None:
        reply["weights"] = state_record(weights)
        meta["num-examples"] = num_examples
    return reply


def _feature_arrays(micro_batches: int, batch: int, tokens: int, dim: int) -> Arrays:
    """Any compressor's codes plus side information fit in two elements per feature
    value (fp32 pass-through needs one); the decoders then check exact sizes."""
    return Arrays(FEATURE_DTYPES, 2 * micro_batches * batch * tokens * dim + 64 * micro_batches, payload=True)


def _extra_stream_arrays(cfg: SplitConfig, micro_batches: int, tokens: int, max_text_tokens: int) -> dict[str, Arrays]:
    """The records of the residual and text streams, when the run has them."""
    out = {}
    for st in active_streams(cfg)[1:]:
        n = max_text_tokens if st == "text" else tokens
        out[FEATURE_RECORDS[st]] = _feature_arrays(micro_batches, cfg.batch_size, n, stream_width(cfg, st))
    return out


def train_reply_schema(cfg: SplitConfig, tokens: int, dim: int, steps: int, final: bool, max_text_tokens: int) -> Schema:
    """The reply to a ``train.split_step`` that encodes ``steps`` micro-batches."""
    meta = {
        "partition-id": Key(INT, 0, 1 << 30), "round": Key(INT, 1, MAX_STEPS), "exchange": Key(INT, 0, MAX_STEPS),
        "compute-s": Key(FLOAT, 0.0, 1e7, required=False), TIMING_KEY: TIMING,
        "client-aux-loss": Key(FLOATS, -1e9, 1e9, max_len=cfg.steps_per_exchange, required=False),
    }
    arrays = {}
    if steps:
        b = cfg.batch_size
        meta |= {"samples": Key(INT, steps * b, steps * b), "mask-bytes": Key(INTS, 0, b * max_text_tokens, max_len=steps)}
        arrays["features"] = _feature_arrays(steps, b, tokens, dim)
        arrays.update(_extra_stream_arrays(cfg, steps, tokens, max_text_tokens))
        text_names = {"labels" if cfg.text_mode == "quantized" else "ids", "lens", "mask"}
        arrays["text"] = Arrays(TEXT_DTYPES, steps * b * max_text_tokens, names=frozenset(text_names))
    if final:
        meta["num-examples"] = Key(INT, 1, 1 << 40)
        arrays["weights"] = Arrays(frozenset({"float32", "bool"}), 1 << 31, ndim=None)  # bool: codec 'initted' flags
    return Schema(TRAIN, meta, arrays)


@dataclass
class TrainUpload:
    partition: int
    y_hats: list[Streams[torch.Tensor]]
    texts: list[TextBatch]
    weights: dict[str, torch.Tensor] | None
    num_examples: int
    aux_losses: list[float]


def parse_train_reply(
    content: RecordDict, cfg: SplitConfig, codecs: Streams[ServerCodec], tokens: int, dim: int,
    vocab_size: int, pad_id: int, expect_steps: int, expect_weights: bool, expect: Expect | None = None,
) -> TrainUpload:
    """Validate (schema first, then values) and decode a ``train.split_step`` reply with
    the server's codec halves. ``expect`` carries what the reply must echo (round,
    exchange, partition) and the global weights' names and shapes. Raises :class:`WireError`."""
    expect = expect or Expect()
    validate(content, train_reply_schema(cfg, tokens, dim, expect_steps, expect_weights, expect.max_text_tokens), expect)
    meta = content.config_records["meta"]
    partition = meta["partition-id"]
    y_hats: list[Streams[torch.Tensor]] = []
    texts: list[TextBatch] = []
    if expect_steps:
        if "text" not in content.array_records:
            raise WireError("missing record 'text'")
        arrays = record_to_arrays(content.array_records["text"])
        texts = split_train_text(arrays, meta, expect_steps, cfg.batch_size, vocab_size, pad_id, cfg.text_mode == "quantized")
        shapes = micro_batch_shapes(cfg, [int(t.lens.sum()) for t in texts], expect_steps)
        y_hats = decode_payload_records(content, cfg, codecs, shapes)
        longest = max(int(t.lens.max()) for t in texts)
        if longest > expect.max_text_tokens:
            raise WireError(f"a text of {longest} tokens exceeds the LLM's {expect.max_text_tokens} text positions")
    weights = None
    num_examples = 0
    if expect_weights:
        if "weights" not in content.array_records:
            raise WireError("final reply is missing 'weights'")
        weights = record_state(content.array_records["weights"])
        for k, v in weights.items():
            if not torch.isfinite(v).all():
                raise WireError(f"weight {k!r} contains NaN or inf")
        num_examples = meta_int(meta, "num-examples", 1, 1 << 40)
    aux = meta.get("client-aux-loss", [])
    return TrainUpload(partition, y_hats, texts, weights, num_examples, list(aux) if isinstance(aux, list) else [])


# ============================================================================ evaluate.split_infer
def eval_request(cfg: SplitConfig, rnd: int, weights: dict[str, torch.Tensor]) -> RecordDict:
    return RecordDict(
        {
            "meta": ConfigRecord({"round": rnd}),
            "weights": state_record(weights),
            "config": ConfigRecord(cfg.to_run_config()),
        }
    )


def eval_reply(
    cfg: SplitConfig, rnd: int, partition: int, vocab_size: int, codecs: Streams[ClientCodec],
    payloads: list[Streams[Payload]], prompts: list[np.ndarray], answers: list[np.ndarray], splits: np.ndarray,
    qtypes: np.ndarray, bad_records: int,
) -> RecordDict:
    """The reply to ``evaluate.split_infer``: the test set's codes in micro-batches, its
    prompts (unless they travel quantised), answers, first-question lengths and question
    types; ``bad-records`` counts the records the client's loader skipped."""
    text = encode_ragged(prompts, vocab_size, "prompt_")
    if cfg.text_mode == "quantized":  # the prompts travel as quantised embeddings
        del text["prompt_ids"]
    text.update(encode_ragged(answers, vocab_size, "answer_"))
    text["qtype"] = qtypes.astype(np.uint8)
    text["prompt_split"] = splits.astype(np.uint16)
    shapes = micro_batch_shapes(cfg, text_token_counts(text["prompt_lens"], cfg.batch_size), len(payloads))
    return RecordDict(
        {
            **payload_records(cfg, codecs, payloads, shapes),
            "text": arrays_to_record(text),
            "meta": ConfigRecord({
                "partition-id": partition, "round": rnd, "eval-count": len(prompts), "micro-batches": len(payloads),
                "bad-records": bad_records,
            }),
        }
    )


def eval_reply_schema(cfg: SplitConfig, tokens: int, dim: int, max_text_tokens: int) -> Schema:
    """The reply to ``evaluate.split_infer``; array bounds follow its validated meta."""
    b = cfg.batch_size
    meta = {
        "partition-id": Key(INT, 0, 1 << 30), "round": Key(INT, 1, MAX_STEPS),
        "eval-count": Key(INT, 1, MAX_EVAL_SAMPLES), "micro-batches": Key(INT, 1, -(-MAX_EVAL_SAMPLES // b)),
        "bad-records": Key(INT, 0, 1 << 40, required=False), "compute-s": Key(FLOAT, 0.0, 1e7, required=False),
        TIMING_KEY: TIMING,
    }

    def arrays(m) -> dict[str, Arrays]:
        n = m["eval-count"]
        names = {"prompt_ids", "prompt_lens", "answer_ids", "answer_lens", "qtype", "prompt_split"}
        if cfg.text_mode == "quantized":  # prompts travel as quantised embeddings
            names.discard("prompt_ids")
        return {"features": _feature_arrays(m["micro-batches"], b, tokens, dim),
                **_extra_stream_arrays(cfg, m["micro-batches"], tokens, max_text_tokens),
                "text": Arrays(TEXT_DTYPES, n * max_text_tokens, names=frozenset(names))}

    return Schema(EVALUATE, meta, arrays)


@dataclass
class EvalUpload:
    partition: int
    y_hats: list[Streams[torch.Tensor]]
    prompts: list  # token ids, or (len, D) decoded embeddings with text-mode=quantized
    answers: list[np.ndarray]
    qtypes: np.ndarray
    splits: np.ndarray  # tokens of the first question, before the image
    bad_records: int = 0  # records the client skipped under on-bad-record=skip


def parse_eval_reply(
    content: RecordDict, cfg: SplitConfig, codecs: Streams[ServerCodec], tokens: int, dim: int, vocab_size: int,
    expect: Expect | None = None,
) -> EvalUpload:
    """Validate (schema first, then values) and decode an ``evaluate.split_infer`` reply
    (raises :class:`WireError`)."""
    expect = expect or Expect()
    validate(content, eval_reply_schema(cfg, tokens, dim, expect.max_text_tokens), expect)
    meta = content.config_records["meta"]
    partition, n, micro = meta["partition-id"], meta["eval-count"], meta["micro-batches"]
    if micro != -(-n // cfg.batch_size):
        raise WireError(f"{micro} micro-batches cannot hold {n} eval samples of batch {cfg.batch_size}")
    arrays = record_to_arrays(content.array_records["text"])
    answers = decode_ragged(arrays, "answer_", n, vocab_size)
    if cfg.text_mode == "quantized":
        prompt_lens = arrays.get("prompt_lens")
        if prompt_lens is None or prompt_lens.dtype != np.uint16 or prompt_lens.shape != (n,) or int(prompt_lens.min()) == 0:
            raise WireError("text 'prompt_lens' must be uint16 with one non-zero length per sample")
        shapes = micro_batch_shapes(cfg, text_token_counts(prompt_lens, cfg.batch_size), micro)
        # decoded prompt embeddings (the server's text codec projects them in evaluate)
        y_hats, prompts = split_prompt_stream(decode_payload_records(content, cfg, codecs, shapes), [int(v) for v in prompt_lens])
    else:
        y_hats = decode_payload_records(content, cfg, codecs, micro_batch_shapes(cfg, None, micro))
        prompts = decode_ragged(arrays, "prompt_", n, vocab_size)
    qtype = arrays.get("qtype")
    if qtype is None or qtype.dtype != np.uint8 or qtype.shape != (n,):
        raise WireError("text 'qtype' must be uint8 with one entry per sample")
    split = arrays.get("prompt_split")
    if split is None or split.dtype != np.uint16 or split.shape != (n,):
        raise WireError("text 'prompt_split' must be uint16 with one entry per sample")
    if any(int(s) > len(p) for s, p in zip(split, prompts)):
        raise WireError("text 'prompt_split' exceeds a prompt's length")
    if n and int(qtype.max()) >= len(QTYPES):
        raise WireError(f"text 'qtype' {int(qtype.max())} is not a question type (0..{len(QTYPES) - 1})")
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_answer_tokens > expect.max_text_tokens:
        raise WireError(f"an eval prompt of {longest} tokens leaves no room for the answer in {expect.max_text_tokens} positions")
    bad = meta.get("bad-records", 0)
    return EvalUpload(partition, y_hats, prompts, answers, qtype, split.astype(np.int64), bad)
