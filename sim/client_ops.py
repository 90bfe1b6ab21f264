"""Everything a client does, as plain functions over a :class:`ClientRuntime`.

The ClientApp handlers unpack a message, call these, and pack the reply; the
in-process reference trainer calls the same functions directly. Heavy objects (the
model, the tokenised dataset) are cached per worker process keyed by the config, and
every message restores the client's weights and optimiser state from Flower's
``context.state`` into them, so cached objects never carry state between clients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .batches import TextBatch, TokenisedExamples, eval_text, pixels, step_indices, tokenise, train_text
from .compress import Payload
from .config import SplitConfig
from .data import client_shard, load_examples
from .model import ClientModel, build_client_model
from .schedule import lr_at
from .split_step import client_apply_grads, trainable
from .tokenizer import get_tokenizer


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


@dataclass
class Encodings:
    """What a client uploads for some micro-batches."""

    payloads: list[Payload]
    texts: list[TextBatch]
    aux_losses: list[float]


def client_runtime(cfg: SplitConfig, partition: int, num_partitions: int) -> ClientRuntime:
    """The runtime for one client (cached model and data; weights restored by the caller)."""
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition-id {partition} is outside [0, {num_partitions})")
    model, opt = _model_and_optimiser(cfg)
    data = _tokenised(cfg)
    train_idx, test_idx = _shard(cfg, partition, num_partitions)
    tok = get_tokenizer(cfg)
    return ClientRuntime(cfg, partition, model, opt, data, train_idx, test_idx, tok.pad_token_id, len(tok))


@functools.lru_cache(maxsize=4)
def _model_and_optimiser(cfg: SplitConfig) -> tuple[ClientModel, torch.optim.Optimizer]:
    model = build_client_model(cfg)
    opt = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, opt


@functools.lru_cache(maxsize=4)
def _tokenised(cfg: SplitConfig) -> TokenisedExamples:
    examples = load_examples(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record)
    return tokenise(examples, get_tokenizer(cfg))


@functools.lru_cache(maxsize=1024)
def _shard(cfg: SplitConfig, partition: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    examples = load_examples(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record)
    train, test = client_shard(
        examples, partition, num_partitions, cfg.partitioner, cfg.seed, cfg.dirichlet_alpha, cfg.test_fraction
    )
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


# ----------------------------------------------------------------------------- state
def load_weights(rt: ClientRuntime, weights: dict[str, torch.Tensor]) -> None:
    """Overwrite the trainable weights (strict: every trainable name, nothing else)."""
    names = {n for n, p in rt.model.named_parameters() if p.requires_grad}
    if set(weights) != names:
        missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
        raise ValueError(f"client weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    params = dict(rt.model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise ValueError(f"weight {n!r} has shape {tuple(t.shape)}, expected {tuple(params[n].shape)}")
            params[n].copy_(t)


def get_weights(rt: ClientRuntime) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in rt.model.named_parameters() if p.requires_grad}


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
    local = step_indices(len(rt.train_idx), rt.cfg.batch_size, rt.cfg.seed, rt.partition, rnd, step)
    return rt.train_idx[local]


def encode_steps(rt: ClientRuntime, rnd: int, steps: list[int]) -> Encodings:
    """Forward + encode + pack the given micro-batches with the current weights."""
    payloads, texts, aux = [], [], []
    codec = rt.model.codec
    with torch.no_grad():
        for s in steps:
            idx = micro_batch(rt, rnd, s)
            enc = rt.model(pixels(rt.data, idx))
            payloads.append(codec.pack(enc))
            texts.append(train_text(rt.data, idx, rt.pad_id))
            aux.append(float(enc.aux_loss))
    return Encodings(payloads, texts, aux)


def apply_steps(rt: ClientRuntime, rnd: int, steps: list[int], grads: list[torch.Tensor]) -> list[float]:
    """Recompute the given micro-batches and apply their received gradients."""
    if len(steps) != len(grads):
        raise ValueError(f"{len(grads)} gradients for {len(steps)} steps")
    pix = [pixels(rt.data, micro_batch(rt, rnd, s)) for s in steps]
    return client_apply_grads(rt.model, rt.opt, pix, grads, [lr_at(rt.cfg, rnd, s) for s in steps])


def eval_indices(rt: ClientRuntime) -> tuple[np.ndarray, int]:
    """Local test indices padded by wrap-around to whole micro-batches, and the real count."""
    n, b = len(rt.test_idx), rt.cfg.batch_size
    total = -(-n // b) * b
    return rt.test_idx[np.arange(total) % n], n


def encode_eval(rt: ClientRuntime) -> tuple[list[Payload], list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray, int]:
    """Codes of the local test set (in micro-batches), prompts, answers, first-question
    lengths and question types."""
    idx, n = eval_indices(rt)
    payloads = []
    with torch.no_grad():
        for start in range(0, len(idx), rt.cfg.batch_size):
            chunk = idx[start : start + rt.cfg.batch_size]
            payloads.append(rt.model.codec.pack(rt.model(pixels(rt.data, chunk))))
    prompts, answers = eval_text(rt.data, idx[:n])
    return payloads, prompts, answers, rt.data.first_turn_len[idx[:n]], rt.data.qtype[idx[:n]], n
