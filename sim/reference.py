"""In-process reference trainer: the same split step functions, no Flower.

It walks the exact schedule of :class:`strategies.SplitFedStrategy` (seeded client
sampling, fused exchanges, FedAvg, split inference) but hands tensors over directly
instead of building messages. Codes still go through ``pack``/``unpack`` so the
server sees what it would see on the wire. Used to check that the Flower simulation
reproduces it (same seed, same per-step losses) and as the P1 throughput baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .client_ops import (
    apply_steps, client_runtime, encode_eval, encode_steps, get_optimiser_state, get_weights,
    load_optimiser_state, load_weights,
)
from .config import SplitConfig
from .server_ops import build_server, evaluate, exchange_schedule, fedavg, initial_client_weights, sample_partitions, server_steps
from .wire import FeatureShape, arrays_to_grads, grads_to_arrays


@dataclass
class ReferenceResult:
    step_losses: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    samples: int = 0
    train_s: float = 0.0


def run_reference(cfg: SplitConfig, num_partitions: int, evaluate_rounds: bool = True) -> ReferenceResult:
    """Train ``num-server-rounds`` rounds over ``num_partitions`` in-process clients."""
    torch.manual_seed(cfg.seed)
    server = build_server(cfg)
    global_w = initial_client_weights(cfg)
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    local_w: dict[int, dict[str, torch.Tensor]] = {}
    res = ReferenceResult()
    partitions = list(range(num_partitions))
    for rnd in range(1, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_partitions(partitions, cfg, rnd)
        for p in sampled:
            local_w[p] = global_w
        grads: dict[int, list[torch.Tensor]] = {}
        for apply, encode in exchange_schedule(cfg):
            y_hats, texts = [], []
            for p in sampled:
                rt = client_runtime(cfg, p, num_partitions)
                load_weights(rt, local_w[p])
                load_optimiser_state(rt, optim_state.get(p))
                if apply:
                    apply_steps(rt, rnd, apply, _wire_grads(cfg, grads[p], len(apply), server.tokens, server.dim))
                if encode:
                    enc = encode_steps(rt, rnd, encode)
                    y_hats.append([server.model.codec.unpack(pl, (cfg.batch_size, server.tokens, server.dim)) for pl in enc.payloads])
                    texts.append(enc.texts)
                local_w[p] = get_weights(rt)
                optim_state[p] = get_optimiser_state(rt)
            if encode:
                losses, g = server_steps(server, rnd, encode, y_hats, texts)
                res.step_losses += losses
                res.samples += len(encode) * cfg.batch_size * len(sampled)
                grads = dict(zip(sampled, g))
        global_w = fedavg([local_w[p] for p in sampled], [len(client_runtime(cfg, p, num_partitions).train_idx) for p in sampled])
        res.train_s += time.perf_counter() - t0
        if evaluate_rounds:
            res.accuracy.append(_evaluate(cfg, server, global_w, num_partitions))
    return res


def _wire_grads(cfg: SplitConfig, grads: list[torch.Tensor], steps: int, tokens: int, dim: int) -> list[torch.Tensor]:
    """The gradients as the client receives them (after the downlink dtype)."""
    shape = FeatureShape(steps, cfg.batch_size, tokens, dim)
    return arrays_to_grads(grads_to_arrays(grads, cfg), shape, cfg)


def _evaluate(cfg: SplitConfig, server, global_w: dict[str, torch.Tensor], num_partitions: int) -> float:
    correct = total = 0
    for p in range(num_partitions):
        rt = client_runtime(cfg, p, num_partitions)
        load_weights(rt, global_w)
        payloads, prompts, answers, splits, qtypes, n = encode_eval(rt)
        y_hats = [server.model.codec.unpack(pl, (cfg.batch_size, server.tokens, server.dim)) for pl in payloads]
        c, t = evaluate(server, y_hats, prompts, answers, qtypes, splits)["all"]
        correct, total = correct + c, total + t
    return correct / total if total else float("nan")
