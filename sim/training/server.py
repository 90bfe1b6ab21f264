"""Everything the server computes, as plain functions over a :class:`ServerRuntime`:
client sampling, the exchange schedule, the server's micro-batch steps, FedAvg, the
codecs' round sync, and split inference. The round engine (:mod:`sim.training.engine`)
calls them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sim.compress.streams import Streams
from sim.config import SplitConfig
from sim.data.batches import QTYPES, TextBatch
from sim.data.tokenizer import get_tokenizer
from sim.model import (
    ServerModel, build_client_model, build_server_model, client_state, fold_client_state, image_token_count,
    load_server_synced, set_stage, state_needs_init, stream_width,
)
from sim.model.device import configure_determinism, server_device

from .schedule import lr_at, make_optimiser
from .split_step import exact_match, image_split, server_generate, server_train_step, trainable


@dataclass
class ServerRuntime:
    cfg: SplitConfig
    model: ServerModel
    opt: torch.optim.Optimizer
    tokens: int  # image tokens N per sample
    dim: int  # image feature width D at the split point
    vocab_size: int
    pad_id: int
    eos_id: int


def build_server(cfg: SplitConfig) -> ServerRuntime:
    """The server half on ``server-device`` (``device`` by default) and its optimiser."""
    tok = get_tokenizer(cfg)
    device = server_device(cfg)
    configure_determinism(device, cfg.cuda_deterministic)
    model = build_server_model(cfg, len(tok), device)
    opt = make_optimiser(cfg, trainable(model))
    return ServerRuntime(
        cfg, model, opt, image_token_count(cfg), stream_width(cfg, "image"), len(tok), tok.pad_token_id, tok.eos_token_id
    )


def initial_client_weights(cfg: SplitConfig) -> dict[str, torch.Tensor]:
    """The global client-side state before round 1 (the seeded initialisation; codecs
    with data-dependent state still need :func:`sim.training.client.init_codec_state`)."""
    return client_state(build_client_model(cfg))


def needs_codec_init(rt: ServerRuntime, weights: dict[str, torch.Tensor]) -> bool:
    """Whether the global client state still lacks the codecs' data-dependent state."""
    return state_needs_init(rt.model.specs(), weights)


def sync_round_state(rt: ServerRuntime, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global client state for the next round: fold the codecs' synced buffers
    (AlignedVQ EMA codebook, RD-FSQ EMA statistics) and install what the server halves
    decode with. Called after FedAvg and after the codec initialisation."""
    weights = fold_client_state(rt.model.specs(), weights)
    load_server_synced(rt.model, weights)
    return weights


def sample_partitions(partitions: list[int], cfg: SplitConfig, rnd: int, evaluation: bool = False) -> list[int]:
    """Seeded sample of ``fraction-train`` (``fraction-evaluate`` for evaluation) of the
    clients for a round, sorted."""
    fraction = cfg.fraction_evaluate if evaluation else cfg.fraction_train
    if fraction >= 1.0:
        return sorted(partitions)
    k = max(1, int(round(fraction * len(partitions))))
    rng = np.random.default_rng([cfg.seed, rnd, 11 if evaluation else 7])
    return sorted(int(p) for p in rng.choice(sorted(partitions), size=k, replace=False))


def exchange_schedule(cfg: SplitConfig, rnd: int = 1) -> list[tuple[list[int], list[int]]]:
    """Per exchange of round ``rnd``: (steps whose gradients are applied, steps encoded).

    ``local-steps`` micro-batches in chunks of ``steps-per-exchange``; exchange ``e``
    applies chunk ``e-1`` and encodes chunk ``e``; the last one only applies (and brings
    the updated weights back). In a round where the client half is frozen
    (``client-finetune=frozen``) nothing is applied and nothing comes back: one exchange
    per chunk of ``frozen-steps-per-exchange`` (0: the whole round), each only encodes.
    The client's features depend only on the step index there, so any grouping gives the
    same results; fewer exchanges save a message round trip each, which is what a
    deployment pays most for (docs/performance.md)."""
    steps = list(range(cfg.local_steps))
    trains = cfg.client_trains_at(rnd)
    size = cfg.steps_per_exchange if trains else (cfg.frozen_steps_per_exchange or cfg.local_steps)
    chunks = [steps[i : i + size] for i in range(0, len(steps), size)]
    if not trains:
        return [([], chunk) for chunk in chunks]
    return [([] if e == 0 else chunks[e - 1], chunks[e] if e < len(chunks) else []) for e in range(len(chunks) + 1)]


def server_steps(
    rt: ServerRuntime, rnd: int, steps: list[int], y_hats: list[list[Streams[torch.Tensor]]], texts: list[list[TextBatch]]
) -> tuple[list[float], list[list[Streams[torch.Tensor]]]]:
    """Run the server steps of one exchange (micro-batch steps ``steps`` of round ``rnd``).

    ``y_hats[c][i]`` is client ``c``'s micro-batch ``steps[i]``. Each step concatenates
    all clients' micro-batch. Returns the losses and ``grads[c][i]`` (empty lists in a
    round whose client half is frozen: no gradient is computed for the features)."""
    set_stage(rt.model, rt.cfg.stage_at(rnd))
    feature_grads = rt.cfg.client_trains_at(rnd)
    losses, grads = [], [[] for _ in y_hats]
    for i, step in enumerate(steps):
        loss, g = server_train_step(
            rt.model, rt.opt, [y[i] for y in y_hats], [t[i] for t in texts], rt.pad_id, lr_at(rt.cfg, rnd, step),
            image_position=rt.cfg.image_position, grad_clip=rt.cfg.grad_clip,
            feature_grads=feature_grads,
        )
        losses.append(loss)
        for c, gc in enumerate(g or []):
            grads[c].append(gc)
    return losses, grads


def fedavg(weights: list[dict[str, torch.Tensor]], counts: list[int]) -> dict[str, torch.Tensor]:
    """Sample-weighted average, accumulated in float64 in the given (partition) order."""
    if not weights:
        raise ValueError("FedAvg needs at least one client")
    total = float(sum(counts))
    out = {}
    for name in weights[0]:
        acc = torch.zeros_like(weights[0][name], dtype=torch.float64)
        for w, n in zip(weights, counts):
            acc += w[name].to(torch.float64) * (n / total)
        out[name] = acc.to(weights[0][name].dtype)
    return out


def evaluate(
    rt: ServerRuntime, y_hats: list[Streams[torch.Tensor]], prompts: list, answers: list, qtypes: np.ndarray,
    splits: np.ndarray,
) -> dict[str, tuple[int, int]]:
    """Greedy split inference; (correct, total) overall and per question type.

    ``y_hats``: the decoded streams per micro-batch; ``prompts``: token ids, or (len, D)
    decoded embeddings with ``text-mode=quantized``."""
    rt.model.eval()
    dev = rt.model.device
    with torch.no_grad():
        feats = torch.cat([rt.model.image_embeds(y.map(lambda _, v: v.to(dev))) for y in y_hats])[: len(prompts)]
        prompts = [rt.model.text_codec(p.to(dev)) if torch.is_tensor(p) and p.is_floating_point() else p for p in prompts]
    correct: list[bool] = []
    bs = rt.cfg.eval_batch_size
    for i in range(0, len(prompts), bs):
        split = image_split(rt.cfg.image_position, torch.as_tensor(splits[i : i + bs]))
        pred = server_generate(
            rt.model, feats[i : i + bs], prompts[i : i + bs], rt.eos_id, rt.pad_id, rt.cfg.max_answer_tokens, split
        )
        correct += exact_match(pred, answers[i : i + bs])
    rt.model.train()
    out = {"all": (sum(correct), len(correct))}
    for q in np.unique(qtypes):
        sel = [c for c, t in zip(correct, qtypes) if t == q]
        out[QTYPES[int(q)]] = (sum(sel), len(sel))
    return out
