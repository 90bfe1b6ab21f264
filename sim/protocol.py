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

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from .batches import TextBatch
from .client_ops import (
    ClientRuntime, apply_steps, client_runtime, encode_eval, encode_steps, get_optimiser_state,
    get_weights, load_optimiser_state, load_weights,
)
from .compress import PayloadError, ServerCodec
from .config import ConfigError, SplitConfig
from .model import image_token_count, llm_hidden_size
from .wire import (
    FeatureShape, WireError, arrays_to_grads, arrays_to_record, concat_payloads, decode_ragged,
    decode_train_text, encode_ragged, encode_train_text, grads_to_arrays, meta_int, record_to_arrays,
    split_payload,
)

HELLO, TRAIN, EVALUATE = "query.hello", "train.split_step", "evaluate.split_infer"
UPLINK_INFO = ("features", "text", "weights")  # records whose arrays are information
DOWNLINK_INFO = ("grads", "weights")
MAX_STEPS = 1 << 20


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
) -> RecordDict:
    rd = RecordDict(
        {
            "meta": ConfigRecord(
                {"round": rnd, "exchange": exchange, "apply-steps": apply, "encode-steps": encode, "final": final}
            )
        }
    )
    if weights is not None:
        rd["weights"] = ArrayRecord.from_torch_state_dict(weights)
        rd["config"] = ConfigRecord(cfg.to_run_config())
    if grads:
        rd["grads"] = arrays_to_record(grads_to_arrays(grads, cfg))
    return rd


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
    partition: int
    num_partitions: int


def node_identity(node_config: dict) -> NodeIdentity:
    try:
        return NodeIdentity(int(node_config["partition-id"]), int(node_config["num-partitions"]))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "node config needs integer 'partition-id' and 'num-partitions' "
            "(set by the simulation, or --node-config on a SuperNode)"
        ) from None


def client_hello(state: RecordDict, node: NodeIdentity) -> RecordDict:
    return RecordDict({"meta": ConfigRecord({"partition-id": node.partition, "num-partitions": node.num_partitions})})


def _restore(content: RecordDict, state: RecordDict, node: NodeIdentity) -> ClientRuntime:
    if "config" in content.config_records:
        state["client.config"] = content.config_records["config"]
    if "client.config" not in state.config_records:
        raise WireError("no run config: the first message of a round must carry 'config'")
    cfg = SplitConfig.from_run_config(dict(state.config_records["client.config"]))
    rt = client_runtime(cfg, node.partition, node.num_partitions)
    source = content if "weights" in content.array_records else state
    key = "weights" if source is content else "client.weights"
    if key not in source.array_records:
        raise WireError("no client weights: the first message of a round must carry 'weights'")
    load_weights(rt, source.array_records[key].to_torch_state_dict())
    optim = state.array_records.get("client.optim")
    load_optimiser_state(rt, optim.to_torch_state_dict() if optim is not None else None)
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
    """Handle ``train.split_step``: apply received gradients, encode the next micro-batches."""
    meta = content.config_records["meta"]
    rnd = meta_int(meta, "round", 1, MAX_STEPS)
    apply, encode = _step_list(meta, "apply-steps"), _step_list(meta, "encode-steps")
    rt = _restore(content, state, node)
    reply_meta = ConfigRecord({"partition-id": node.partition, "round": rnd, "exchange": meta_int(meta, "exchange", 0, MAX_STEPS)})
    reply = RecordDict({"meta": reply_meta})
    if apply:
        if "grads" not in content.array_records:
            raise WireError("apply-steps given without 'grads'")
        shape = FeatureShape(len(apply), rt.cfg.batch_size, image_token_count(rt.cfg), llm_hidden_size(rt.cfg))
        grads = arrays_to_grads(record_to_arrays(content.array_records["grads"]), shape, rt.cfg)
        reply_meta["client-aux-loss"] = apply_steps(rt, rnd, apply, grads)
    if encode:
        enc = encode_steps(rt, rnd, encode)
        reply["features"] = arrays_to_record(concat_payloads(enc.payloads).arrays())
        text = [encode_train_text(t, rt.vocab_size) for t in enc.texts]
        reply["text"] = arrays_to_record({k: np.concatenate([t[k] for t in text]) for k in ("ids", "lens", "mask")})
        reply_meta["samples"] = len(encode) * rt.cfg.batch_size
        reply_meta["mask-bytes"] = [int(t["mask"].size) for t in text]
    if bool(meta.get("final", False)):
        reply["weights"] = ArrayRecord.from_torch_state_dict(get_weights(rt))
        reply_meta["num-examples"] = len(rt.train_idx)
    _persist(rt, state)
    return reply


def client_evaluate(content: RecordDict, state: RecordDict, node: NodeIdentity) -> RecordDict:
    """Handle ``evaluate.split_infer``: encode the local test set with the global weights."""
    rt = _restore(content, state, node)
    payloads, prompts, answers, splits, qtypes, n = encode_eval(rt)
    text = encode_ragged(prompts, rt.vocab_size, "prompt_")
    text.update(encode_ragged(answers, rt.vocab_size, "answer_"))
    text["qtype"] = qtypes.astype(np.uint8)
    text["prompt_split"] = splits.astype(np.uint16)
    return RecordDict(
        {
            "features": arrays_to_record(concat_payloads(payloads).arrays()),
            "text": arrays_to_record(text),
            "meta": ConfigRecord({"partition-id": node.partition, "eval-count": n, "micro-batches": len(payloads)}),
        }
    )


# ============================================================================ client -> server
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


def _decode_features(content: RecordDict, codec: ServerCodec, shape: FeatureShape) -> list[torch.Tensor]:
    if "features" not in content.array_records:
        raise WireError("missing record 'features'")
    parts = split_payload(record_to_arrays(content.array_records["features"]), shape.micro_batches)
    try:
        return [codec.unpack(p, shape.per_batch) for p in parts]
    except PayloadError as err:
        raise WireError(f"features: {err}") from None


def parse_train_reply(
    content: RecordDict, cfg: SplitConfig, codec: ServerCodec, tokens: int, dim: int,
    vocab_size: int, pad_id: int, expect_steps: int, expect_weights: bool,
) -> TrainUpload:
    """Validate and decode a ``train.split_step`` reply (raises :class:`WireError`)."""
    meta = content.config_records.get("meta")
    if meta is None:
        raise WireError("missing record 'meta'")
    partition = meta_int(meta, "partition-id", 0, 1 << 30)
    y_hats: list[torch.Tensor] = []
    texts: list[TextBatch] = []
    if expect_steps:
        shape = FeatureShape(expect_steps, cfg.batch_size, tokens, dim)
        y_hats = _decode_features(content, codec, shape)
        if "text" not in content.array_records:
            raise WireError("missing record 'text'")
        arrays = record_to_arrays(content.array_records["text"])
        texts = _split_train_text(arrays, meta, expect_steps, cfg.batch_size, vocab_size, pad_id)
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


def _split_train_text(arrays, meta, steps: int, batch: int, vocab_size: int, pad_id: int) -> list[TextBatch]:
    mask_bytes = meta.get("mask-bytes")
    if not isinstance(mask_bytes, list) or len(mask_bytes) != steps:
        raise WireError("meta 'mask-bytes' must list one size per micro-batch")
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


def parse_eval_reply(
    content: RecordDict, cfg: SplitConfig, codec: ServerCodec, tokens: int, dim: int, vocab_size: int
) -> EvalUpload:
    """Validate and decode an ``evaluate.split_infer`` reply (raises :class:`WireError`)."""
    meta = content.config_records.get("meta")
    if meta is None or "text" not in content.array_records:
        raise WireError("eval reply needs 'meta' and 'text'")
    partition = meta_int(meta, "partition-id", 0, 1 << 30)
    n = meta_int(meta, "eval-count", 1, 1 << 30)
    micro = meta_int(meta, "micro-batches", 1, 1 << 20)
    if micro != -(-n // cfg.batch_size):
        raise WireError(f"{micro} micro-batches cannot hold {n} eval samples of batch {cfg.batch_size}")
    y_hats = _decode_features(content, codec, FeatureShape(micro, cfg.batch_size, tokens, dim))
    arrays = record_to_arrays(content.array_records["text"])
    prompts = decode_ragged(arrays, "prompt_", n, vocab_size)
    answers = decode_ragged(arrays, "answer_", n, vocab_size)
    qtype = arrays.get("qtype")
    if qtype is None or qtype.dtype != np.uint8 or qtype.shape != (n,):
        raise WireError("text 'qtype' must be uint8 with one entry per sample")
    split = arrays.get("prompt_split")
    if split is None or split.dtype != np.uint16 or split.shape != (n,):
        raise WireError("text 'prompt_split' must be uint16 with one entry per sample")
    if any(int(s) > len(p) for s, p in zip(split, prompts)):
        raise WireError("text 'prompt_split' exceeds a prompt's length")
    return EvalUpload(partition, y_hats, prompts, answers, qtype, split.astype(np.int64))


__all__ = [
    "DOWNLINK_INFO", "EVALUATE", "HELLO", "TRAIN", "UPLINK_INFO", "EvalUpload", "NodeIdentity",
    "TrainUpload", "client_evaluate", "client_hello", "client_train", "eval_request", "hello_request",
    "node_identity", "parse_eval_reply", "parse_train_reply", "train_request",
]
