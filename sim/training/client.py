"""Everything a client computes, as plain functions over a :class:`ClientRuntime`.

The message handlers (:mod:`sim.training.client_handlers`) unpack a message, call these,
and pack the reply. Heavy objects (the model, the tokenised dataset) are cached per
worker process keyed by the config, and every message restores the client's weights and
optimiser state from Flower's ``context.state`` into them, so cached objects never carry
state between clients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from sim.compress import Encoded, Payload
from sim.compress.streams import Streams
from sim.config import SplitConfig
from sim.data import bad_record_count, client_shard, load_examples
from sim.data.batches import TextBatch, TokenisedExamples, eval_text, pixels, step_indices, tokenise, train_text
from sim.data.tokenizer import get_tokenizer
from sim.model import ClientBatch, ClientModel, build_client_model, client_state, image_token_count, load_client_state
from sim.model.device import client_device, configure_determinism
from sim.model.feature_noise import FeatureRelease, secret_noise_seed
from sim.model.processor import image_processor

from .schedule import lr_at, make_optimiser
from .split_step import client_apply_grads, trainable


@dataclass
class ClientRuntime:
    cfg: SplitConfig
    partition: int
    model: ClientModel
    opt: torch.optim.Optimizer
    data: TokenisedExamples
    train_idx: np.ndarray
    test_idx: np.ndarray
    pad_id: int
    vocab_size: int
    bad_records: int = 0  # records of the local data skipped under on-bad-record=skip


@dataclass
class Encodings:
    """What a client uploads for some micro-batches: per micro-batch, one payload per
    active uplink stream, its text and aux loss."""

    payloads: list[Streams[Payload]]
    texts: list[TextBatch]
    aux_losses: list[float]


def client_runtime(cfg: SplitConfig, partition: int, num_partitions: int, own_data: bool = False,
                   noise_secret: str = "") -> ClientRuntime:
    """The runtime for one client (cached model and data; weights restored by the caller).

    ``own_data``: ``cfg.data_path`` is this site's own file, used whole (not partitioned).
    ``noise_secret``: the node's ``noise-secret``; the model's ``noise_seed`` is
    :func:`secret_noise_seed` of it and ``cfg.seed``, or ``cfg.seed`` when empty (set on every
    call: the cached model is shared by the runtimes of one config)."""
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition-id {partition} is outside [0, {num_partitions})")
    tok = get_tokenizer(cfg)
    model, opt = _model_and_optimiser(cfg, len(tok))
    model.noise_seed = secret_noise_seed(cfg.seed, noise_secret) if noise_secret else cfg.seed
    data = _tokenised(cfg)
    train_idx, test_idx = _shard(cfg, 0, 1) if own_data else _shard(cfg, partition, num_partitions)
    bad = bad_record_count(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record,
        cfg.data_allow_outside_paths)
    return ClientRuntime(cfg, partition, model, opt, data, train_idx, test_idx, tok.pad_token_id, len(tok), bad)


@functools.lru_cache(maxsize=4)
def _model_and_optimiser(cfg: SplitConfig, vocab_size: int) -> tuple[ClientModel, torch.optim.Optimizer]:
    device = client_device(cfg)
    configure_determinism(device, cfg.cuda_deterministic)
    model = build_client_model(cfg, vocab_size, device)
    opt = make_optimiser(cfg, trainable(model))
    return model, opt


@functools.lru_cache(maxsize=4)
def _tokenised(cfg: SplitConfig) -> TokenisedExamples:
    examples = load_examples(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record,
        cfg.data_allow_outside_paths)
    return tokenise(examples, get_tokenizer(cfg))


@functools.lru_cache(maxsize=1024)
def _shard(cfg: SplitConfig, partition: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    examples = load_examples(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record,
        cfg.data_allow_outside_paths)
    train, test = client_shard(
        examples, partition, num_partitions, cfg.partitioner, cfg.seed, cfg.dirichlet_alpha, cfg.test_fraction
    )
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


# ----------------------------------------------------------------------------- state
def load_weights(rt: ClientRuntime, weights: dict[str, torch.Tensor]) -> None:
    """Overwrite the client state: trainable weights plus the codecs' synced buffers
    (strict: every name, nothing else; see :func:`sim.model.client_state_names`)."""
    load_client_state(rt.model, weights)


def get_weights(rt: ClientRuntime) -> dict[str, torch.Tensor]:
    """The client state, on the CPU (where FedAvg and the wire keep it)."""
    return {k: v.cpu() for k, v in client_state(rt.model).items()}


def get_optimiser_state(rt: ClientRuntime) -> dict[str, torch.Tensor]:
    """Optimiser state flattened to ``"<param index>.<name>"`` tensors."""
    return {f"{i}.{k}": v.detach().clone() for i, st in rt.opt.state_dict()["state"].items() for k, v in st.items()}


def load_optimiser_state(rt: ClientRuntime, flat: dict[str, torch.Tensor] | None) -> None:
    """Restore (or reset, if ``flat`` is empty) the optimiser state."""
    groups = rt.opt.state_dict()["param_groups"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in (flat or {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v.clone()
    rt.opt.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- steps
def micro_batch(rt: ClientRuntime, rnd: int, step: int) -> np.ndarray:
    local = step_indices(len(rt.train_idx), rt.cfg.batch_size_at(rnd), rt.cfg.seed, rt.partition, rnd, step)
    return rt.train_idx[local]


def release_tag(rt: ClientRuntime, kind: str, rnd: int, step: int = 0) -> str:
    """The name of one release of a micro-batch's features (``kind``: train, eval, init): a
    micro-batch and its recompute share it, every other release has its own, so with
    ``feature-noise-clip`` each draws fresh noise (sim/model/feature_noise.py)."""
    return f"{kind}/p{rt.partition}/r{rnd}/s{step}"


def client_batch(rt: ClientRuntime, idx: np.ndarray, text: list[np.ndarray] | None = None,
                 tag: str | None = None) -> ClientBatch:
    """The micro-batch of examples ``idx``; with ``text-mode=quantized`` also its token ids
    (the whole sequences unless ``text`` gives others, e.g. evaluation prompts). ``tag``
    (:func:`release_tag`) names the release; ``feature-noise-clip > 0`` needs it."""
    if rt.cfg.text_mode == "quantized" and text is None:
        text = [rt.data.ids[i] for i in idx]
    if rt.cfg.feature_noise_clip > 0 and tag is None:
        raise ValueError("feature-noise-clip > 0 needs the release tag of the micro-batch")
    px = pixels(rt.data, idx, image_processor(rt.cfg)).to(rt.model.device)
    release = FeatureRelease(tag, rt.cfg.feature_noise_clip) if tag is not None else None
    return ClientBatch(px, text if rt.cfg.text_mode == "quantized" else None, release)


def on_cpu(enc: Encoded) -> Encoded:
    """What a codec packs, moved to the CPU (packing is numpy); ``enc`` itself when it is there."""
    tensors = [enc.y, enc.codes, enc.aux_loss, *enc.side.values()]
    if all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor)):
        return enc
    return Encoded(y=enc.y.detach().cpu(), codes=enc.codes.detach().cpu(), aux_loss=enc.aux_loss.detach().cpu(),
                   side={k: v.detach().cpu() for k, v in enc.side.items()})


def pack_streams(rt: ClientRuntime, encs: Streams[Encoded]) -> Streams[Payload]:
    codecs = rt.model.codecs()
    return encs.map(lambda s, e: codecs[s].pack(on_cpu(e)))


def encode_steps(rt: ClientRuntime, rnd: int, steps: list[int]) -> Encodings:
    """Forward + encode + pack the given micro-batches with the current weights."""
    payloads, texts, aux = [], [], []
    with torch.no_grad():
        for s in steps:
            idx = micro_batch(rt, rnd, s)
            encs = rt.model.encode(client_batch(rt, idx, tag=release_tag(rt, "train", rnd, s)))
            payloads.append(pack_streams(rt, encs))
            texts.append(train_text(rt.data, idx, rt.pad_id))
            aux.append(float(sum(e.aux_loss for e in encs.values())))
    return Encodings(payloads, texts, aux)


def apply_steps(rt: ClientRuntime, rnd: int, steps: list[int], grads: list[Streams[torch.Tensor]]) -> list[float]:
    """Recompute the given micro-batches and apply their received gradients (``grads[i]``:
    one per stream)."""
    if len(steps) != len(grads):
        raise ValueError(f"{len(grads)} gradients for {len(steps)} steps")
    batches = [client_batch(rt, micro_batch(rt, rnd, s), tag=release_tag(rt, "train", rnd, s)) for s in steps]
    return client_apply_grads(rt.model, rt.opt, batches, grads, [lr_at(rt.cfg, rnd, s) for s in steps], rt.cfg.grad_clip)


INIT_ROUND = 0  # codec initialisation draws its micro-batches from a round of its own


def init_batches(rt: ClientRuntime) -> int:
    """Micro-batches for the data-dependent codec initialisation: enough tokens for one per
    AlignedVQ code (at least 4, at most 64 micro-batches)."""
    codes = max((getattr(c, "size", 0) for c in rt.model.codecs().values() if c.needs_init), default=0)
    tokens = rt.cfg.batch_size * image_token_count(rt.cfg)
    return int(min(64, max(4, -(-codes // tokens))))


def init_codec_state(rt: ClientRuntime) -> dict[str, torch.Tensor]:
    """Run the codecs' data-dependent initialisation (AlignedVQ k-means, RD-FSQ EMA
    statistics) on this client's own micro-batches; returns the client state."""
    batches = [client_batch(rt, micro_batch(rt, INIT_ROUND, s), tag=release_tag(rt, "init", INIT_ROUND, s))
               for s in range(init_batches(rt))]
    rt.model.init_codecs(batches)
    return get_weights(rt)


def eval_indices(rt: ClientRuntime) -> tuple[np.ndarray, int]:
    """Local test indices padded by wrap-around to whole micro-batches, and the real count."""
    n, b = len(rt.test_idx), rt.cfg.batch_size
    total = -(-n // b) * b
    return rt.test_idx[np.arange(total) % n], n


def encode_eval(rt: ClientRuntime, rnd: int) -> tuple[list[Streams[Payload]], list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray, int]:
    """Codes of the local test set (in micro-batches; with ``text-mode=quantized`` the text
    stream holds the prompts of the micro-batch's real samples), prompts, answers,
    first-question lengths and question types, for the evaluation of round ``rnd`` (one
    release: a test image padded in twice gets the same noise)."""
    idx, n = eval_indices(rt)
    prompts, answers = eval_text(rt.data, idx[:n])
    payloads = []
    with torch.no_grad():
        for start in range(0, len(idx), rt.cfg.batch_size):
            chunk = idx[start : start + rt.cfg.batch_size]
            batch = client_batch(rt, chunk, prompts[start : start + rt.cfg.batch_size], release_tag(rt, "eval", rnd))
            payloads.append(pack_streams(rt, rt.model.encode(batch)))
    return payloads, prompts, answers, rt.data.first_turn_len[idx[:n]], rt.data.qtype[idx[:n]], n
