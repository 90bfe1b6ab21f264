"""Learning-rate schedule shared by the server and every client.

Both sides step their optimisers once per micro-batch step, so one global step index
``t = (round - 1) * local_steps + step`` orders all updates of a run. The schedule is
a pure function of ``t`` and the config, so a client that rebuilds its optimiser from
``context.state`` in any worker process, the server, the reference trainer and a
resumed run all use the same rate::

    constant:  lr
    cosine:    lr * t / warmup                                     for t < warmup
               lr * (m + (1 - m) * (1 + cos(pi * u)) / 2)           otherwise,
               u = (t - warmup) / (total - warmup),  m = min-lr-ratio

Linear warm-up followed by cosine decay is the usual recipe for training small
transformers from scratch (it is also TinyLLaVA's); on the synthetic benchmark it
reached the same accuracy in fewer steps than a constant rate (docs/results-spine.md).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from sim.config import SplitConfig


def total_steps(cfg: SplitConfig) -> int:
    return cfg.num_server_rounds * cfg.local_steps


def stage_span(cfg: SplitConfig, rnd: int) -> tuple[int, int, float]:
    """``(first round, rounds, peak lr)`` of the stage that round ``rnd`` belongs to: the
    whole run, except with ``stage=both``, whose align and finetune stages each have their
    own warm-up and cosine decay (at ``align-lr`` and ``lr``)."""
    if cfg.stage == "both":
        if rnd <= cfg.align_rounds:
            return 1, cfg.align_rounds, cfg.align_lr
        return cfg.align_rounds + 1, cfg.num_server_rounds - cfg.align_rounds, cfg.lr
    return 1, cfg.num_server_rounds, cfg.align_lr if cfg.stage == "align" else cfg.lr


def lr_at(cfg: SplitConfig, rnd: int, step: int) -> float:
    """The learning rate of micro-batch ``step`` (0-based) of round ``rnd`` (1-based)."""
    first, rounds, peak = stage_span(cfg, rnd)
    if cfg.lr_schedule == "constant":
        return peak
    return warmup_cosine(peak, (rnd - first) * cfg.local_steps + step, rounds * cfg.local_steps, cfg.warmup_steps,
                         cfg.min_lr_ratio)


def warmup_cosine(peak: float, t: int, total: int, warmup: int, min_ratio: float) -> float:
    """The rate of step ``t`` of ``total``: linear warm-up over ``warmup`` steps, then cosine
    decay to ``min_ratio * peak`` (also the pretraining's schedule, sim/pretrain/train.py)."""
    if t < warmup:
        return peak * (t + 1) / warmup
    u = min(1.0, (t - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * u)))


def set_lr(opt: Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def make_optimiser(cfg: SplitConfig, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW as both sides use it (``lr`` is set per step by :func:`set_lr`)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)


def clip_grads(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Clip the global gradient norm of ``params`` to ``max_norm`` (``grad-clip``; 0 = off)."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
