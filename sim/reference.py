"""In-process reference trainer: the same split step functions, no Flower.

It walks the exact schedule of :class:`strategies.SplitFedStrategy` (seeded client
sampling, fused exchanges, FedAvg, split inference) but hands tensors over directly
instead of building messages. Codes still go through ``pack``/``unpack`` so the
server sees what it would see on the wire. Used to check that the Flower simulation
reproduces it (same seed, same per-step losses) and as the P1 throughput baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from flwr.app import RecordDict

from .client_ops import (
    apply_steps, client_runtime, encode_eval, encode_steps, get_optimiser_state, get_weights,
    init_codec_state, load_optimiser_state, load_weights,
)
from .config import SplitConfig
from .model import state_needs_init
from .server_ops import (
    ServerRuntime, build_server, evaluate, exchange_schedule, fedavg, initial_client_weights, sample_partitions,
    server_steps, sync_round_state, unpack_streams,
)
from .streams import decode_grad_records, grad_records, micro_batch_shapes, split_prompt_stream, text_token_counts


@dataclass
class ReferenceResult:
    step_losses: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    samples: int = 0
    train_s: float = 0.0
    eval_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # last evaluation: (correct, total) per question type and "all"
    client_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # the final global client-side weights
    server: ServerRuntime | None = None  # the trained server half


def run_reference(cfg: SplitConfig, num_partitions: int, evaluate_rounds: bool = True) -> ReferenceResult:
    """Train ``num-server-rounds`` rounds over ``num_partitions`` in-process clients."""
    torch.manual_seed(cfg.seed)
    server = build_server(cfg)
    partitions = list(range(num_partitions))
    global_w = initial_client_weights(cfg)
    if state_needs_init(cfg, global_w):  # codec initialisation on the lowest partition (as the strategy)
        rt = client_runtime(cfg, partitions[0], num_partitions)
        load_weights(rt, global_w)
        load_optimiser_state(rt, None)
        global_w = init_codec_state(rt)
    global_w = sync_round_state(server, global_w)
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    local_w: dict[int, dict[str, torch.Tensor]] = {}
    res = ReferenceResult()
    for rnd in range(1, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_partitions(partitions, cfg, rnd)
        for p in sampled:
            local_w[p] = global_w
        grads: dict[int, list] = {}
        tokens: dict[int, list[int]] = {}  # text tokens per encoded micro-batch (text stream shapes)
        for apply, encode in exchange_schedule(cfg):
            y_hats, texts = [], []
            for p in sampled:
                rt = client_runtime(cfg, p, num_partitions)
                load_weights(rt, local_w[p])
                load_optimiser_state(rt, optim_state.get(p))
                if apply:
                    apply_steps(rt, rnd, apply, _wire_grads(cfg, grads[p], micro_batch_shapes(cfg, tokens[p], len(apply))))
                if encode:
                    enc = encode_steps(rt, rnd, encode)
                    tokens[p] = [int(t.lens.sum()) for t in enc.texts]
                    y_hats.append([unpack_streams(server, pl, n) for pl, n in zip(enc.payloads, tokens[p])])
                    texts.append(enc.texts)
                local_w[p] = get_weights(rt)
                optim_state[p] = get_optimiser_state(rt)
            if encode:
                losses, g = server_steps(server, rnd, encode, y_hats, texts)
                res.step_losses += losses
                res.samples += len(encode) * cfg.batch_size * len(sampled)
                grads = dict(zip(sampled, g))
        global_w = fedavg([local_w[p] for p in sampled], [len(client_runtime(cfg, p, num_partitions).train_idx) for p in sampled])
        global_w = sync_round_state(server, global_w)
        res.train_s += time.perf_counter() - t0
        if evaluate_rounds:
            res.eval_counts = evaluate_global(cfg, server, global_w, num_partitions, rnd)
            c, t = res.eval_counts.get("all", (0, 0))
            res.accuracy.append(c / t if t else float("nan"))
    res.client_weights, res.server = global_w, server
    return res


def _wire_grads(cfg: SplitConfig, grads: list, shapes: dict) -> list:
    """The gradients as the client receives them (through the downlink records and codec)."""
    return decode_grad_records(RecordDict(grad_records(cfg, grads)), cfg, shapes)


def evaluate_global(
    cfg: SplitConfig, server, global_w: dict[str, torch.Tensor], num_partitions: int, rnd: int,
    images: torch.Tensor | None = None, train_samples: int = 0,
) -> dict[str, tuple[int, int]]:
    """(correct, total) over the evaluated clients' local test sets (all of them unless
    ``fraction-evaluate`` < 1), overall and per question type.

    ``images`` (uint8, the dataset's shape) stands in for the dataset's images, e.g. JPEG
    round-tripped copies; the cached dataset itself is left untouched. ``train_samples``
    > 0 scores the first that many *training* examples of each client instead of its
    test set (to tell over-fitting from under-fitting)."""
    totals: dict[str, tuple[int, int]] = {}
    for p in sample_partitions(list(range(num_partitions)), cfg, rnd, evaluation=True):
        rt = client_runtime(cfg, p, num_partitions)
        if train_samples > 0:
            rt = replace(rt, test_idx=rt.train_idx[:train_samples])
        if images is not None:
            if images.shape != rt.data.images.shape or images.dtype != rt.data.images.dtype:
                raise ValueError(f"images must be {tuple(rt.data.images.shape)} {rt.data.images.dtype}, "
                                 f"got {tuple(images.shape)} {images.dtype}")
            rt = replace(rt, data=replace(rt.data, images=images))
        load_weights(rt, global_w)
        payloads, prompts, answers, splits, qtypes, n = encode_eval(rt)
        counts = text_token_counts([len(q) for q in prompts], cfg.batch_size)
        y_hats = [unpack_streams(server, pl, c) for pl, c in zip(payloads, counts)]
        if cfg.text_mode == "quantized":  # the server sees the prompts as decoded embeddings only
            y_hats, prompts = split_prompt_stream(y_hats, [len(q) for q in prompts])
        for k, (c, t) in evaluate(server, y_hats, prompts, answers, qtypes, splits).items():
            c0, t0 = totals.get(k, (0, 0))
            totals[k] = (c0 + c, t0 + t)
    return totals
