"""The in-process reference trainer: the round engine over the in-process transport.

:func:`run_reference` is the same run as the Flower simulation — the same engine, message
builders, client handlers, parsers and server steps — with the clients called directly in
this process instead of through Ray (:class:`sim.training.transport.InProcessTransport`).
Its step losses equal the simulation's bitwise (docs/architecture.md). The experiments
and the privacy study train with it; the P1 benchmark measures Flower's overhead against it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from sim.config import SplitConfig
from sim.wire.ledger import Ledger, NetworkModel

from .client import client_runtime, load_weights
from .client_handlers import evaluate_runtime
from .engine import RoundEngine, RoundReport
from .server import ServerRuntime, build_server, initial_client_weights, sample_partitions
from .transport import InProcessTransport, client_threads


@dataclass
class ReferenceResult:
    step_losses: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    samples: int = 0
    train_s: float = 0.0
    eval_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # last evaluation: (correct, total) per question type and "all"
    client_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # the final global client-side weights
    server: ServerRuntime | None = None  # the trained server half
    ledger: Ledger | None = None  # every message of the run, both directions
    reports: list[RoundReport] = field(default_factory=list)


def reference_engine(cfg: SplitConfig, evaluate_rounds: bool = True, ledger: Ledger | None = None,
                     on_round=None) -> RoundEngine:
    """A round engine with a fresh server half, seeded as the ServerApp seeds it."""
    torch.manual_seed(cfg.seed)
    server = build_server(cfg)
    ledger = ledger or Ledger(NetworkModel.from_config(cfg))
    return RoundEngine(cfg, server, ledger, on_round=on_round, evaluate_rounds=evaluate_rounds)


def run_reference(cfg: SplitConfig, num_partitions: int, evaluate_rounds: bool = True) -> ReferenceResult:
    """Train ``num-server-rounds`` rounds over ``num_partitions`` in-process clients."""
    res = ReferenceResult()

    def on_round(report: RoundReport) -> None:
        res.reports.append(report)
        res.step_losses += report.step_losses
        res.samples += report.samples
        res.train_s += report.train_s
        if evaluate_rounds:
            res.eval_counts = report.eval_counts
            res.accuracy.append(report.accuracy)

    engine = reference_engine(cfg, evaluate_rounds, on_round=on_round)
    with reference_transport(cfg, num_partitions) as transport:
        res.client_weights = engine.run(transport, initial_client_weights(cfg), cfg.num_server_rounds,
                                        cfg.exchange_timeout_s)
    res.server, res.ledger = engine.server, engine.ledger
    return res


@contextlib.contextmanager
def reference_transport(cfg: SplitConfig, num_partitions: int, threads: int | None = None) -> Iterator[InProcessTransport]:
    """In-process clients with the torch threads a Ray simulation gives them (or ``threads``);
    their optimiser checkpoints (``checkpoint=true``) go to a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="reference-client-state-") as state_dir:
        yield InProcessTransport(num_partitions, threads=client_threads(cfg.client_cpus) if threads is None else threads,
                                 state_dir=state_dir)


def evaluate_global(
    cfg: SplitConfig, server: ServerRuntime, global_w: dict[str, torch.Tensor], num_partitions: int, rnd: int,
    images: torch.Tensor | None = None, train_samples: int = 0,
) -> dict[str, tuple[int, int]]:
    """(correct, total) of round ``rnd``'s evaluation (all clients' local test sets, or
    ``fraction-evaluate`` of them), overall and per question type, through the same
    evaluation reply and scoring as a run.

    ``images`` (uint8, the dataset's shape) stands in for the dataset's images, e.g. JPEG
    round-tripped copies; the cached dataset itself is left untouched. ``train_samples``
    > 0 scores the first that many *training* examples of each client instead of its
    test set (to tell over-fitting from under-fitting)."""
    engine = RoundEngine(cfg, server, Ledger(NetworkModel.from_config(cfg)))
    replies = []
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
        replies.append((p, evaluate_runtime(rt, rnd, p)))
    return engine.score_contents(rnd, replies)
