"""The split-learning message protocol: request builders, client handlers, reply parsers.

Message types (``docs/protocol.md`` has the full record schema):

* ``query.hello``          server -> client: who are you? reply: partition id, shard sizes
* ``train.split_step``     one fused exchange: apply the gradients of the previous
                           micro-batches, encode the next ones; the first exchange of a
                           round carries the global client weights and the run config,
                           the last one asks for the updated weights back
* ``evaluate.split_infer`` global weights down; codes of the local test set up

Client handlers are pure functions of (content, state, node identity) so that the
ClientApp stays a thin wrapper and the reference trainer can reuse the client ops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from .batches import QTYPES, TextBatch
from .client_ops import (
    ClientRuntime, apply_steps, client_runtime, encode_eval, encode_steps, get_optimiser_state,
    get_weights, init_codec_state, load_optimiser_state, load_weights, micro_batch,
)
from .client_state import load_optimiser_file, save_optimiser_file
from .compress import ServerCodec
from .config import ConfigError, SplitConfig
from .faults import EVAL, inject
from .model import STREAM_PREFIX, active_streams, client_state_names, stream_width
from .streams import (
    FEATURE_RECORDS, GRAD_RECORDS, decode_grad_records, decode_payload_records, grad_records, micro_batch_shapes,
    payload_records, split_prompt_stream, text_token_counts,
)
from .wire import (
    WireError, arrays_to_record, decode_label_text, decode_ragged, decode_train_text, encode_label_text,
    encode_ragged, encode_train_text, meta_int, record_to_arrays,
)
from .schema import FLOAT, FLOATS, INT, INTS, Arrays, Expect, Key, Schema, validate

HELLO, TRAIN, EVALUATE, INIT = "query.hello", "train.split_step", "evaluate.split_infer", "query.init_codec"
UPLINK_INFO = (*FEATURE_RECORDS.values(), "text", "weights", "codec-state")  # records whose arrays are information
DOWNLINK_INFO = (*GRAD_RECORDS.values(), "weights")
MAX_STEPS = 1 << 20
MAX_EVAL_SAMPLES = 1 << 16  # per client and round; larger local test sets must be subsampled
FEATURE_DTYPES = frozenset({"uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32"})
TEXT_DTYPES = frozenset({"uint8", "uint16", "uint32"})


# ============================================================================ server -> client
def hello_request() -> RecordDict:
    return RecordDict({"meta": ConfigRecord({"kind": "hello"})})


def train_request(
    cfg: SplitConfig,
    rnd: int,
    exchange: int,
    apply: list[int],
    encode: list[int],
    final: bool,
    grads: list[torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    resumed_from: int = 0,
) -> RecordDict:
    """``train.split_step`` request. With ``checkpoint`` on, the final exchange asks the
    client to save its optimiser state (``save-state``); after a resume the first
    exchange says from which round (``resumed-from``) so a fresh client reloads it."""
    meta = {"round": rnd, "exchange": exchange, "apply-steps": apply, "encode-steps": encode, "final": final}
    if final and cfg.checkpoint:
        meta["save-state"] = True
    rd = RecordDict({"meta": ConfigRecord(meta)})
    if weights is not None:
        rd["weights"] = ArrayRecord.from_torch_state_dict(weights)
        rd["config"] = ConfigRecord(cfg.to_run_config())
        rd["meta"]["resumed-from"] = resumed_from
    if grads:
        for name, record in grad_records(cfg, grads).items():
            rd[name] = record
    return rd


def init_request(cfg: SplitConfig, weights: dict[str, torch.Tensor]) -> RecordDict:
    """``query.init_codec``: run the codecs' data-dependent initialisation (AlignedVQ
    k-means, RD-FSQ EMA statistics) on the client's data, before round 1."""
    return RecordDict(
        {
            "meta": ConfigRecord({"round": 0}),
            "weights": ArrayRecord.from_torch_state_dict(weights),
            "config": ConfigRecord(cfg.to_run_config()),
        }
    )


def eval_request(cfg: SplitConfig, rnd: int, weights: dict[str, torch.Tensor]) -> RecordDict:
    return RecordDict(
        {
            "meta": ConfigRecord({"round": rnd}),
            "weights": ArrayRecord.from_torch_state_dict(weights),
            "config": ConfigRecord(cfg.to_run_config()),
        }
    )


# ============================================================================ client side
@dataclass(frozen=True)
class NodeIdentity:
    """Who a client is, from its node config (``--node-config`` on a SuperNode).

    ``data-path`` (optional) is this site's own LLaVA JSON file: the node then trains
    on all of it instead of partition ``partition`` of the run's shared dataset.
    ``state-dir`` (optional) is where it keeps its optimiser checkpoints."""

    partition: int
    num_partitions: int
    data_path: str = ""
    state_dir: str = ""


NODE_KEYS = ("partition-id", "num-partitions", "data-path", "state-dir")


def node_identity(node_config: dict) -> NodeIdentity:
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"unknown node config keys {unknown}; allowed: {', '.join(NODE_KEYS)}")
    try:
        node = NodeIdentity(int(node_config["partition-id"]), int(node_config["num-partitions"]),
                            str(node_config.get("data-path", "")), str(node_config.get("state-dir", "")))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "node config needs integer 'partition-id' and 'num-partitions' "
            "(set by the simulation, or --node-config on a SuperNode)"
        ) from None
    if not 0 <= node.partition < node.num_partitions:
        raise ConfigError(f"node config 'partition-id' {node.partition} is outside [0, {node.num_partitions})")
    return node


def client_hello(state: RecordDict, node: NodeIdentity) -> RecordDict:
    return RecordDict({"meta": ConfigRecord({"partition-id": node.partition, "num-partitions": node.num_partitions})})


def _client_config(content: RecordDict, state: RecordDict, node: NodeIdentity) -> SplitConfig:
    """The run config (sent with the first message of a round, kept in ``state``),
    with this node's own ``data-path`` if it has one."""
    if "config" in content.config_records:
        state["client.config"] = content.config_records["config"]
    if "client.config" not in state.config_records:
        raise WireError("no run config: the first message of a round must carry 'config'")
    cfg = SplitConfig.from_run_config(dict(state.config_records["client.config"]))
    if node.data_path:
        if cfg.dataset != "llava-json":
            raise ConfigError(f"node config 'data-path' is set but the run's dataset is {cfg.dataset!r}, not 'llava-json'")
        if cfg.tokenizer == "auto":
            raise ConfigError("node config 'data-path' needs the run's 'tokenizer' to be a shared directory: "
                              "tokenizer=auto would build a different vocabulary on every site")
        cfg = cfg.replace(data_path=node.data_path)
    elif cfg.dataset == "llava-json" and not cfg.data_path:
        raise ConfigError("the run config leaves 'data-path' empty, so this SuperNode needs --node-config data-path=...")
    return cfg


def _restore(cfg: SplitConfig, content: RecordDict, state: RecordDict, node: NodeIdentity) -> ClientRuntime:
    rt = client_runtime(cfg, node.partition, node.num_partitions, own_data=bool(node.data_path))
    source = content if "weights" in content.array_records else state
    key = "weights" if source is content else "client.weights"
    if key not in source.array_records:
        raise WireError("no client weights: the first message of a round must carry 'weights'")
    load_weights(rt, source.array_records[key].to_torch_state_dict())
    optim = state.array_records.get("client.optim")
    if optim is not None:
        load_optimiser_state(rt, optim.to_torch_state_dict())
    else:
        resumed = content.config_records.get("meta", {}).get("resumed-from", 0)
        saved = load_optimiser_file(cfg, node, resumed) if isinstance(resumed, int) and resumed > 0 else None
        load_optimiser_state(rt, saved)
    return rt


def _persist(rt: ClientRuntime, state: RecordDict) -> None:
    state["client.weights"] = ArrayRecord.from_torch_state_dict(get_weights(rt))
    state["client.optim"] = ArrayRecord.from_torch_state_dict(get_optimiser_state(rt))


def _step_list(meta: ConfigRecord, key: str) -> list[int]:
    v = meta.get(key, [])
    if not isinstance(v, list) or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < MAX_STEPS for s in v):
        raise WireError(f"meta '{key}' must be a list of step indices")
    return list(v)


def client_train(content: RecordDict, state: RecordDict, node: NodeIdentity) -> RecordDict:
    """Handle ``train.split_step``: apply received gradients, encode the next micro-batches.

    The reply's ``meta.compute-s`` is the handler's own time, so the server can tell
    its clients' compute from the runtime's messaging cost."""
    t0 = time.perf_counter()
    meta = content.config_records["meta"]
    rnd, exchange = meta_int(meta, "round", 1, MAX_STEPS), meta_int(meta, "exchange", 0, MAX_STEPS)
    apply, encode = _step_list(meta, "apply-steps"), _step_list(meta, "encode-steps")
    cfg = _client_config(content, state, node)
    inject(cfg.fault_inject, node.partition, rnd, exchange)
    rt = _restore(cfg, content, state, node)
    reply_meta = ConfigRecord({"partition-id": node.partition, "round": rnd, "exchange": exchange})
    reply = RecordDict({"meta": reply_meta})
    if apply:
        if "grads" not in content.array_records:
            raise WireError("apply-steps given without 'grads'")
        tokens = [sum(len(rt.data.ids[i]) for i in micro_batch(rt, rnd, s)) for s in apply]
        grads = decode_grad_records(content, rt.cfg, micro_batch_shapes(rt.cfg, tokens, len(apply)))
        reply_meta["client-aux-loss"] = apply_steps(rt, rnd, apply, grads)
    if encode:
        enc = encode_steps(rt, rnd, encode)
        tokens = [int(t.lens.sum()) for t in enc.texts]
        shapes = micro_batch_shapes(rt.cfg, tokens, len(encode))
        for name, record in payload_records(rt.cfg, rt.model.codecs(), enc.payloads, shapes).items():
            reply[name] = record
        quantized = rt.cfg.text_mode == "quantized"
        text = [(encode_label_text if quantized else encode_train_text)(t, rt.vocab_size) for t in enc.texts]
        names = ("labels" if quantized else "ids", "lens", "mask")
        reply["text"] = arrays_to_record({k: np.concatenate([t[k] for t in text]) for k in names})
        reply_meta["samples"] = len(encode) * rt.cfg.batch_size
        reply_meta["mask-bytes"] = [int(t["mask"].size) for t in text]
    if bool(meta.get("final", False)):
        reply["weights"] = ArrayRecord.from_torch_state_dict(get_weights(rt))
        reply_meta["num-examples"] = len(rt.train_idx)
    _persist(rt, state)
    if meta.get("save-state") is True:
        save_optimiser_file(cfg, node, rnd, get_optimiser_state(rt))
    reply_meta["compute-s"] = time.perf_counter() - t0
    return reply


def client_evaluate(content: RecordDict, state: RecordDict, node: NodeIdentity) -> RecordDict:
    """Handle ``evaluate.split_infer``: encode the local test set with the global weights.

    ``meta.bad-records`` is how many records of the node's data were skipped under
    ``on-bad-record=skip``."""
    cfg = _client_config(content, state, node)
    inject(cfg.fault_inject, node.partition, meta_int(content.config_records["meta"], "round", 1, MAX_STEPS), EVAL)
    rt = _restore(cfg, content, state, node)
    payloads, prompts, answers, splits, qtypes, n = encode_eval(rt)
    text = encode_ragged(prompts, rt.vocab_size, "prompt_")
    if rt.cfg.text_mode == "quantized":  # the prompts travel as quantised embeddings
        del text["prompt_ids"]
    text.update(encode_ragged(answers, rt.vocab_size, "answer_"))
    text["qtype"] = qtypes.astype(np.uint8)
    text["prompt_split"] = splits.astype(np.uint16)
    shapes = micro_batch_shapes(rt.cfg, text_token_counts(text["prompt_lens"], rt.cfg.batch_size), len(payloads))
    return RecordDict(
        {
            **payload_records(rt.cfg, rt.model.codecs(), payloads, shapes),
            "text": arrays_to_record(text),
            "meta": ConfigRecord({
                "partition-id": node.partition, "round": meta_int(content.config_records["meta"], "round", 1, MAX_STEPS),
                "eval-count": n, "micro-batches": len(payloads), "bad-records": rt.bad_records,
            }),
        }
    )


def client_init_codec(content: RecordDict, state: RecordDict, node: NodeIdentity) -> RecordDict:
    """Handle ``query.init_codec``: initialise the codecs' data-dependent state from this
    client's own micro-batches and send back only that state (``codec-state``)."""
    cfg = _client_config(content, state, node)
    rt = _restore(cfg, content, state, node)
    full = init_codec_state(rt)
    synced = set(client_state_names(rt.model)) - {n for n, p in rt.model.named_parameters() if p.requires_grad}
    return RecordDict(
        {
            "codec-state": ArrayRecord.from_torch_state_dict({k: full[k] for k in sorted(synced)}),
            "meta": ConfigRecord({"partition-id": node.partition, "round": 0}),
        }
    )


# ============================================================================ client -> server
def hello_schema() -> Schema:
    return Schema(HELLO, {"partition-id": Key(INT, 0, 1 << 30), "num-partitions": Key(INT, 1, 1 << 30)})


def _feature_arrays(micro_batches: int, batch: int, tokens: int, dim: int) -> Arrays:
    """Any compressor's codes plus side information fit in two elements per feature
    value (fp32 pass-through needs one); the decoders then check exact sizes."""
    return Arrays(FEATURE_DTYPES, 2 * micro_batches * batch * tokens * dim + 64 * micro_batches, payload=True)


def train_reply_schema(cfg: SplitConfig, tokens: int, dim: int, steps: int, final: bool, max_text_tokens: int) -> Schema:
    """The reply to a ``train.split_step`` that encodes ``steps`` micro-batches."""
    meta = {
        "partition-id": Key(INT, 0, 1 << 30), "round": Key(INT, 1, MAX_STEPS), "exchange": Key(INT, 0, MAX_STEPS),
        "compute-s": Key(FLOAT, 0.0, 1e7, required=False),
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


def eval_reply_schema(cfg: SplitConfig, tokens: int, dim: int, max_text_tokens: int) -> Schema:
    """The reply to ``evaluate.split_infer``; array bounds follow its validated meta."""
    b = cfg.batch_size
    meta = {
        "partition-id": Key(INT, 0, 1 << 30), "round": Key(INT, 1, MAX_STEPS),
        "eval-count": Key(INT, 1, MAX_EVAL_SAMPLES), "micro-batches": Key(INT, 1, -(-MAX_EVAL_SAMPLES // b)),
        "bad-records": Key(INT, 0, 1 << 40, required=False), "compute-s": Key(FLOAT, 0.0, 1e7, required=False),
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


def _extra_stream_arrays(cfg: SplitConfig, micro_batches: int, tokens: int, max_text_tokens: int) -> dict[str, Arrays]:
    """The records of the residual and text streams, when the run has them."""
    out = {}
    for st in active_streams(cfg)[1:]:
        n = max_text_tokens if st == "text" else tokens
        out[FEATURE_RECORDS[st]] = _feature_arrays(micro_batches, cfg.batch_size, n, stream_width(cfg, st))
    return out


def init_reply_schema() -> Schema:
    """The reply to ``query.init_codec``: the initialised codec state (exact names and
    shapes are checked against the global weights through ``Expect.weights``)."""
    return Schema(INIT, {"partition-id": Key(INT, 0, 1 << 30), "round": Key(INT, 0, 0)},
                  {"codec-state": Arrays(frozenset({"float32", "bool"}), 1 << 31, ndim=None)})


@dataclass
class TrainUpload:
    partition: int
    y_hats: list[torch.Tensor]
    texts: list[TextBatch]
    weights: dict[str, torch.Tensor] | None
    num_examples: int
    aux_losses: list[float]


@dataclass
class EvalUpload:
    partition: int
    y_hats: list[torch.Tensor]
    prompts: list[np.ndarray]
    answers: list[np.ndarray]
    qtypes: np.ndarray
    splits: np.ndarray  # tokens of the first question, before the image
    bad_records: int = 0  # records the client skipped under on-bad-record=skip


def _decode_features(content: RecordDict, cfg: SplitConfig, codec, shapes: dict) -> list:
    """Decode every uplink stream; ``codec`` is the server model (or, image-only, its codec).
    Per micro-batch: the image tensor (one stream) or ``{stream: y_hat}``."""
    codecs = codec.codecs() if hasattr(codec, "codecs") else {"image": codec}
    if set(codecs) != set(shapes):
        raise WireError(f"the server decodes streams {sorted(codecs)} but the run sends {sorted(shapes)}")
    ups = decode_payload_records(content, cfg, codecs, shapes)
    return [u["image"] for u in ups] if len(codecs) == 1 else ups


def parse_init_reply(content: RecordDict, cfg: SplitConfig, expect: Expect | None = None) -> dict[str, torch.Tensor]:
    """Validate and decode a ``query.init_codec`` reply: finite codec state (raises WireError)."""
    validate(content, init_reply_schema(), expect)
    state = content.array_records["codec-state"].to_torch_state_dict()
    prefixes = tuple(STREAM_PREFIX[s] for s in active_streams(cfg))
    for k, v in state.items():
        if not k.startswith(prefixes):
            raise WireError(f"codec state {k!r} belongs to no stream codec")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WireError(f"codec state {k!r} contains NaN or inf")
    return state


def parse_train_reply(
    content: RecordDict, cfg: SplitConfig, codec: ServerCodec, tokens: int, dim: int,
    vocab_size: int, pad_id: int, expect_steps: int, expect_weights: bool, expect: Expect | None = None,
) -> TrainUpload:
    """Validate (schema first, then values) and decode a ``train.split_step`` reply.

    ``expect`` carries what the reply must echo (round, exchange, partition) and the
    global weights' names and shapes. Raises :class:`WireError`."""
    expect = expect or Expect()
    validate(content, train_reply_schema(cfg, tokens, dim, expect_steps, expect_weights, expect.max_text_tokens), expect)
    meta = content.config_records["meta"]
    partition = meta["partition-id"]
    y_hats: list[torch.Tensor] = []
    texts: list[TextBatch] = []
    if expect_steps:
        if "text" not in content.array_records:
            raise WireError("missing record 'text'")
        arrays = record_to_arrays(content.array_records["text"])
        texts = _split_train_text(arrays, meta, expect_steps, cfg.batch_size, vocab_size, pad_id, cfg.text_mode == "quantized")
        shapes = micro_batch_shapes(cfg, [int(t.lens.sum()) for t in texts], expect_steps)
        y_hats = _decode_features(content, cfg, codec, shapes)
        longest = max(int(t.lens.max()) for t in texts)
        if longest > expect.max_text_tokens:
            raise WireError(f"a text of {longest} tokens exceeds the LLM's {expect.max_text_tokens} text positions")
    weights = None
    num_examples = 0
    if expect_weights:
        if "weights" not in content.array_records:
            raise WireError("final reply is missing 'weights'")
        weights = content.array_records["weights"].to_torch_state_dict()
        for k, v in weights.items():
            if not torch.isfinite(v).all():
                raise WireError(f"weight {k!r} contains NaN or inf")
        num_examples = meta_int(meta, "num-examples", 1, 1 << 40)
    aux = meta.get("client-aux-loss", [])
    return TrainUpload(partition, y_hats, texts, weights, num_examples, list(aux) if isinstance(aux, list) else [])


def _split_train_text(
    arrays, meta, steps: int, batch: int, vocab_size: int, pad_id: int, labels_only: bool = False
) -> list[TextBatch]:
    mask_bytes = meta.get("mask-bytes")
    if not isinstance(mask_bytes, list) or len(mask_bytes) != steps:
        raise WireError("meta 'mask-bytes' must list one size per micro-batch")
    if labels_only:
        return _split_label_text(arrays, mask_bytes, steps, batch, vocab_size, pad_id)
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


def _split_label_text(arrays, mask_bytes: list, steps: int, batch: int, vocab_size: int, pad_id: int) -> list[TextBatch]:
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


def parse_eval_reply(
    content: RecordDict, cfg: SplitConfig, codec: ServerCodec, tokens: int, dim: int, vocab_size: int,
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
        y_hats, prompts = split_prompt_stream(_decode_features(content, cfg, codec, shapes), [int(v) for v in prompt_lens])
    else:
        y_hats = _decode_features(content, cfg, codec, micro_batch_shapes(cfg, None, micro))
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


__all__ = [
    "DOWNLINK_INFO", "EVALUATE", "HELLO", "INIT", "TRAIN", "UPLINK_INFO", "EvalUpload", "NodeIdentity",
    "TrainUpload", "client_evaluate", "client_hello", "client_init_codec", "client_train", "eval_request",
    "eval_reply_schema", "hello_request", "hello_schema", "init_request", "init_reply_schema", "node_identity",
    "parse_eval_reply", "parse_init_reply", "parse_train_reply",
    "train_reply_schema", "train_request",
]
