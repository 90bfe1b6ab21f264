"""SplitFed: parallel split learning with FedAvg of the client-side weights, as a Flower strategy.

Thin glue between Flower's ``Strategy`` API and the round engine
(:class:`sim.training.engine.RoundEngine`), which holds the algorithm: the split
exchanges, the server steps, drops and faults, FedAvg, the codecs' sync and evaluation.
Flower's default ``start`` does one ``send_and_receive`` per round; split learning needs
many exchanges per round, so :meth:`SplitFedStrategy.start` runs the engine over the
``Grid`` instead. The other Strategy methods expose the engine's pieces of a round
(the first exchange's messages, FedAvg of final replies, the evaluation messages and
their score) for callers that drive a round themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from sim.config import SplitConfig
from sim.training.engine import RoundEngine, RoundReport
from sim.training.server import ServerRuntime
from sim.training.transport import FlowerTransport
from sim.wire.arrays import record_state, state_record
from sim.wire.ledger import Ledger

log = logging.getLogger(__name__)


class SplitFedStrategy(Strategy):
    """Drives split exchanges and aggregates the client-side weights (``self.engine``)."""

    def __init__(
        self, cfg: SplitConfig, server: ServerRuntime, ledger: Ledger,
        on_round: Callable[[RoundReport], None] | None = None, first_round: int = 1, resumed_from: int = 0,
    ) -> None:
        self.cfg = cfg
        self.engine = RoundEngine(cfg, server, ledger, on_round=self._round_done, first_round=first_round,
                                  resumed_from=resumed_from)
        self._on_round = on_round
        self._result = Result()
        self._evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None

    # ------------------------------------------------------------------ Strategy API
    def summary(self) -> None:
        c = self.cfg
        log.info(
            "SplitFed: compressor=%s bits=%d, %d local steps in exchanges of %d, batch %d per client",
            c.compressor, c.bits, c.local_steps, c.steps_per_exchange, c.batch_size,
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Exchange 0 of a round: weights + config down, encode the first chunk."""
        _reject_config("configure_train", config)
        return self.engine.round_requests(server_round, record_state(arrays))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the final replies' client weights, weighted by local examples."""
        avg, clients = self.engine.fedavg(server_round, replies)
        if avg is None:
            return None, None
        return state_record(avg), MetricRecord({"num-clients": clients})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Split inference on the live clients (``fraction-evaluate`` of them)."""
        _reject_config("configure_evaluate", config)
        return self.engine.eval_requests(server_round, record_state(arrays))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Exact match of the evaluation replies, overall and per question type."""
        return eval_metrics(self.engine.score_eval(server_round, replies))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds of the engine over ``grid``.

        ``timeout`` bounds each exchange (with ``exchange-timeout-s``). The run config is
        the strategy's only configuration: a non-empty ``train_config`` or
        ``evaluate_config`` raises. ``evaluate_fn(round, arrays)`` is called after every
        round with the global client weights; its metrics go to
        ``Result.evaluate_metrics_serverapp``."""
        _reject_config("start(train_config=...)", train_config)
        _reject_config("start(evaluate_config=...)", evaluate_config)
        self.summary()
        self._result, self._evaluate_fn = Result(arrays=initial_arrays), evaluate_fn
        final = self.engine.run(FlowerTransport(grid), record_state(initial_arrays), num_rounds, timeout)
        self._result.arrays = state_record(final)
        return self._result

    def _round_done(self, report: RoundReport) -> None:
        """Each finished round: its metrics into the Result (the evaluation's as
        :meth:`aggregate_evaluate` gives them), ``evaluate_fn``, then ``on_round``."""
        loss = report.step_losses[-1] if report.step_losses else float("nan")
        metrics = {"accuracy": float(report.accuracy), "loss": float(loss)}
        evaluated = eval_metrics(report.eval_counts)
        self._result.evaluate_metrics_clientapp[report.round] = MetricRecord(
            metrics | (dict(evaluated) if evaluated is not None else {}))
        if self._evaluate_fn is not None:
            metrics = self._evaluate_fn(report.round, state_record(self.engine.global_weights))
            if metrics is not None:
                self._result.evaluate_metrics_serverapp[report.round] = metrics
        if self._on_round is not None:
            self._on_round(report)


def eval_metrics(counts: dict[str, tuple[int, int]]) -> MetricRecord | None:
    """``acc-<type>`` (exact match overall and per question type) and ``eval-samples``."""
    if not counts:
        return None
    return MetricRecord({f"acc-{k}": c / n for k, (c, n) in counts.items()} | {"eval-samples": counts["all"][1]})


def _reject_config(where: str, config: ConfigRecord | None) -> None:
    if config:
        raise ValueError(f"SplitFedStrategy.{where}: the run config (SplitConfig) is this strategy's only "
                         f"configuration; got ConfigRecord keys {sorted(config)}")
