"""SplitFed: parallel split learning with FedAvg of the client-side weights.

Built on ``flwr.serverapp.strategy.Strategy``. Flower's default ``start`` does one
``send_and_receive`` per round; split learning needs many exchanges per round, so
``start`` is overridden with this loop (DESIGN.md section 4)::

    for each round:
        sample clients (seeded, fraction-train)
        exchange 0     : global client weights + config down; codes of chunk 0 up
        exchange e     : grads of chunk e-1 down; codes of chunk e up   (fused)
                         -> server: one LLM step per micro-batch on all clients' concatenation
        last exchange  : grads of the last chunk down; updated client weights up
        FedAvg of the client weights (sample-weighted)         [aggregate_train]
        evaluate.split_infer on every client; greedy EM        [aggregate_evaluate]

Every message is one ledger row. A client whose reply is missing, is an error, or
fails validation is dropped for the rest of the round and left out of FedAvg.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from sim.config import SplitConfig
from sim.ledger import Ledger, LedgerRow
from sim.protocol import (
    DOWNLINK_INFO, EVALUATE, HELLO, TRAIN, UPLINK_INFO, eval_request, hello_request,
    parse_eval_reply, parse_train_reply, train_request,
)
from sim.server_ops import ServerRuntime, evaluate, exchange_schedule, fedavg, sample_partitions, server_steps
from sim.wire import WireError, meta_int, payload_bytes, wire_bytes

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What one round produced; handed to the ``on_round`` callback."""

    round: int
    clients: list[int]
    dropped: dict[int, str]
    step_losses: list[float]
    client_aux: float
    eval_counts: dict[str, tuple[int, int]]
    exchanges: int
    wall_s: float
    sim_network_s: float
    samples: int

    @property
    def accuracy(self) -> float:
        c, n = self.eval_counts.get("all", (0, 0))
        return c / n if n else float("nan")


class SplitFedStrategy(Strategy):
    """Drives split exchanges and aggregates the client-side weights."""

    def __init__(
        self,
        cfg: SplitConfig,
        server: ServerRuntime,
        ledger: Ledger,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.server = server
        self.ledger = ledger
        self.on_round = on_round
        self.partitions: dict[int, int] = {}  # partition id -> node id
        self._node_partition: dict[int, int] = {}  # node id -> partition id
        self.global_weights: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ Strategy API
    def summary(self) -> None:
        c = self.cfg
        log.info(
            "SplitFed: compressor=%s bits=%d, %d local steps in exchanges of %d, batch %d per client",
            c.compressor, c.bits, c.local_steps, c.steps_per_exchange, c.batch_size,
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Exchange 0 of a round: weights + config down, encode the first chunk."""
        apply, encode = exchange_schedule(self.cfg)[0]
        weights = arrays.to_torch_state_dict()
        sampled = sample_partitions(sorted(self.partitions), self.cfg, server_round)
        return [
            Message(
                train_request(self.cfg, server_round, 0, apply, encode, False, weights=weights),
                dst_node_id=self.partitions[p], message_type=TRAIN,
            )
            for p in sampled
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the final replies' client weights, weighted by local examples."""
        ups = []
        for msg in replies:
            try:
                ups.append(self._parse_train(msg.content, steps=0, final=True))
            except WireError as err:
                log.warning("round %d: final reply rejected: %s", server_round, err)
        ups.sort(key=lambda u: u.partition)
        if not ups:
            return None, None
        avg = fedavg([u.weights for u in ups], [u.num_examples for u in ups])
        return ArrayRecord.from_torch_state_dict(avg), MetricRecord({"num-clients": len(ups)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        weights = arrays.to_torch_state_dict()
        return [
            Message(eval_request(self.cfg, server_round, weights), dst_node_id=node, message_type=EVALUATE)
            for _, node in sorted(self.partitions.items())
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        counts = self._evaluate_replies(server_round, replies)
        if not counts:
            return None
        return MetricRecord({f"acc-{k}": c / n for k, (c, n) in counts.items()} | {"eval-samples": counts["all"][1]})

    # ------------------------------------------------------------------ the round loop
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
        self.summary()
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        for rnd in range(1, num_rounds + 1):
            t0, net0 = time.perf_counter(), self.ledger.sim_network_s
            self._discover(grid, rnd, timeout)
            report, new_arrays = self._train_round(grid, rnd, arrays, timeout)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            eval_msgs = list(self.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
            eval_replies = self._exchange(grid, eval_msgs, rnd, report.exchanges, EVALUATE, timeout)
            report.eval_counts = self._evaluate_replies(rnd, eval_replies.values())
            report.exchanges += 1
            report.wall_s = time.perf_counter() - t0
            report.sim_network_s = self.ledger.sim_network_s - net0
            metrics = {"accuracy": report.accuracy, "loss": report.step_losses[-1] if report.step_losses else float("nan")}
            result.evaluate_metrics_clientapp[rnd] = MetricRecord({k: float(v) for k, v in metrics.items()})
            if self.on_round is not None:
                self.on_round(report)
        return result

    def _train_round(self, grid: Grid, rnd: int, arrays: ArrayRecord, timeout: float) -> tuple[RoundReport, ArrayRecord | None]:
        """The exchanges of one round; returns its report and the FedAvg'd weights (None if
        no client finished)."""
        schedule = exchange_schedule(self.cfg)
        msgs = list(self.configure_train(rnd, arrays, ConfigRecord(), grid))
        sampled = [self._partition_of(m.metadata.dst_node_id) for m in msgs]
        active = list(sampled)
        dropped: dict[int, str] = {}
        losses: list[float] = []
        aux: list[float] = []
        final_replies: list[Message] = []
        samples = 0
        if len(sampled) < self.cfg.min_train_clients:
            log.warning("round %d skipped: %d clients sampled, min-train-clients is %d", rnd, len(sampled), self.cfg.min_train_clients)
            schedule, dropped = [], {p: "round skipped" for p in sampled}
        for e, (apply, encode) in enumerate(schedule):
            final = e == len(schedule) - 1
            replies = self._exchange(grid, msgs, rnd, e, TRAIN, timeout)
            for p in list(active):
                if p not in replies:
                    dropped[p] = f"no reply in exchange {e}"
                    active.remove(p)
            uploads = {}
            for p in list(active):
                try:
                    uploads[p] = self._parse_train(replies[p].content, steps=len(encode), final=final)
                except WireError as err:
                    log.warning("round %d exchange %d: partition %d rejected: %s", rnd, e, p, err)
                    dropped[p] = f"invalid reply: {err}"
                    active.remove(p)
            for p in active:
                aux += uploads[p].aux_losses
            if len(active) < self.cfg.min_train_clients:
                log.warning("round %d stopped at exchange %d: %d live clients < min-train-clients %d; "
                            "the global weights stay as they were", rnd, e, len(active), self.cfg.min_train_clients)
                break
            if final:
                final_replies = [replies[p] for p in active]
                break
            step_losses, grads = server_steps(
                self.server, rnd, encode, [uploads[p].y_hats for p in active], [uploads[p].texts for p in active]
            )
            losses += step_losses
            samples += len(encode) * self.cfg.batch_size * len(active)
            nxt_apply, nxt_encode = schedule[e + 1]
            msgs = [
                Message(
                    train_request(self.cfg, rnd, e + 1, nxt_apply, nxt_encode, e + 1 == len(schedule) - 1, grads=grads[i]),
                    dst_node_id=self.partitions[p], message_type=TRAIN,
                )
                for i, p in enumerate(active)
            ]
        new_arrays, _ = self.aggregate_train(rnd, final_replies) if final_replies else (None, None)
        if dropped:
            log.warning("round %d: dropped clients %s", rnd, dropped)
        report = RoundReport(
            round=rnd, clients=sampled, dropped=dropped, step_losses=losses,
            client_aux=sum(aux) / len(aux) if aux else 0.0, eval_counts={}, exchanges=len(schedule),
            wall_s=0.0, sim_network_s=0.0, samples=samples,
        )
        return report, new_arrays

    # ------------------------------------------------------------------ helpers
    def _parse_train(self, content: RecordDict, steps: int, final: bool):
        s = self.server
        return parse_train_reply(content, self.cfg, s.model.codec, s.tokens, s.dim, s.vocab_size, s.pad_id, steps, final)

    def _evaluate_replies(self, rnd: int, replies: Iterable[Message]) -> dict[str, tuple[int, int]]:
        totals: dict[str, list[int]] = {}
        s = self.server
        for msg in sorted(replies, key=lambda m: self._partition_of(m.metadata.src_node_id)):
            try:
                up = parse_eval_reply(msg.content, self.cfg, s.model.codec, s.tokens, s.dim, s.vocab_size)
            except WireError as err:
                log.warning("round %d: eval reply rejected: %s", rnd, err)
                continue
            for k, (c, n) in evaluate(s, up.y_hats, up.prompts, up.answers, up.qtypes, up.splits).items():
                t = totals.setdefault(k, [0, 0])
                t[0] += c
                t[1] += n
        return {k: (c, n) for k, (c, n) in totals.items()}

    def _partition_of(self, node_id: int) -> int:
        return self._node_partition.get(node_id, -1)

    def _exchange(self, grid: Grid, msgs: list[Message], rnd: int, exchange: int, kind: str, timeout: float):
        """One send_and_receive; ledger rows for both directions.

        Replies are keyed by partition id (by node id for nodes not yet known)."""
        rows = []
        for m in msgs:
            p = self._partition_of(m.metadata.dst_node_id)
            rows.append(LedgerRow(rnd, exchange, m.metadata.dst_node_id, p, "down", kind,
                                  payload_bytes(m.content, DOWNLINK_INFO), wire_bytes(m)))
        replies: dict[int, Message] = {}
        for r in grid.send_and_receive(msgs, timeout=min(timeout, self.cfg.exchange_timeout_s)):
            p = self._partition_of(r.metadata.src_node_id)
            key = p if p >= 0 else r.metadata.src_node_id
            if r.has_error():
                log.warning("round %d exchange %d: partition %d failed: %s", rnd, exchange, p, r.error.reason)
                continue
            samples = int(r.content.config_records["meta"].get("samples", 0)) if "meta" in r.content.config_records else 0
            rows.append(LedgerRow(rnd, exchange, r.metadata.src_node_id, p, "up", kind,
                                  payload_bytes(r.content, UPLINK_INFO), wire_bytes(r), samples,
                                  payload_bytes(r.content, ("features",))))
            replies[key] = r
        self.ledger.record_exchange(rows)
        return replies

    def _discover(self, grid: Grid, rnd: int, timeout: float) -> None:
        """Learn the partition id of every node not seen yet (``query.hello``)."""
        deadline = time.monotonic() + timeout
        want = max(1, self.cfg.expected_clients)
        node_ids = set(grid.get_node_ids())
        while len(node_ids) < want and time.monotonic() < deadline:
            time.sleep(0.2)  # nodes register with the SuperLink after the ServerApp starts
            node_ids = set(grid.get_node_ids())
        if len(node_ids) < want:
            log.warning("only %d of %d expected clients connected after %.0f s", len(node_ids), want, timeout)
        new = sorted(node_ids - set(self.partitions.values()))
        if not new:
            return
        msgs = [Message(hello_request(), dst_node_id=n, message_type=HELLO) for n in new]
        replies = self._exchange(grid, msgs, rnd, -1, HELLO, timeout)
        for r in replies.values():
            node = r.metadata.src_node_id
            try:
                p = meta_int(r.content.config_records["meta"], "partition-id", 0, 1 << 30)
            except (KeyError, WireError) as err:
                log.warning("node %d sent a bad hello: %s", node, err)
                continue
            if p in self.partitions and self.partitions[p] != node:
                log.warning("partition %d claimed by nodes %d and %d; keeping the first", p, self.partitions[p], node)
                continue
            self.partitions[p] = node
            self._node_partition[node] = p
        if not self.partitions:
            raise RuntimeError("no client answered; is any SuperNode connected?")
        log.info("round %d: %d clients known", rnd, len(self.partitions))
