"""The round engine: split learning's round, written once, for any transport.

The Flower strategy (``strategies/split_fed.py``) runs it over Flower's ``Grid``; the
reference trainer, the experiments and the privacy study run it in process
(:mod:`sim.training.transport`). One round::

    discover     list the live nodes; query.hello to each new one (its partition id)
    sample       seeded fraction-train of the live partitions
    exchange 0   : global client weights + config down; codes of chunk 0 up
    exchange e   : grads of chunk e-1 down; codes of chunk e up   (fused)
                   -> server: one LLM step per micro-batch on all clients' concatenation
    last         : grads of the last chunk down; updated client weights up
                 (a round whose client half is frozen, ``client-finetune=frozen``: no
                 grads and no last exchange; the global weights stay as they were)
    FedAvg       sample-weighted, float64, in partition order; the codecs fold their
                 synced state (AlignedVQ codebook, RD-FSQ EMA statistics)
    evaluate     evaluate.split_infer on fraction-evaluate of the live clients; exact match

Before round 1, if a codec needs data-dependent state, the lowest partition computes it
(``query.init_codec``). Every message is one ledger row, in both directions.

Faults (docs/reliability.md): a client whose reply is missing by ``exchange-timeout-s``,
is an error (its handler raised) or fails validation (schema first, then the decoders)
is dropped for the rest of the round; its partial work never reaches FedAvg, what it
sent stays in the ledger, the round's ``dropped`` names it and why, and rejected
messages are counted. A client that timed out is not asked to evaluate in that round.
With fewer than ``min-train-clients`` the round's FedAvg is skipped and the global
weights stay as they were. Nodes are re-listed every round: one that disappeared is no
longer sampled, and one that comes back (any node id) answers ``hello`` and is used again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import Message, RecordDict

from sim.compress.error_feedback import ErrorFeedback
from sim.config import SplitConfig
from sim.wire.arrays import WireError, payload_bytes, wire_bytes
from sim.wire.ledger import Ledger, LedgerRow
from sim.wire.messages import (
    DOWNLINK_INFO, EVALUATE, HELLO, INIT, TRAIN, UPLINK_INFO, EvalUpload, TrainUpload, eval_request, hello_request,
    hello_schema, init_request, parse_eval_reply, parse_init_reply, parse_train_reply, train_request,
)
from sim.wire.schema import Expect, validate, weight_spec
from sim.wire.streams import FEATURE_RECORDS

from .server import (
    ServerRuntime, evaluate, exchange_schedule, fedavg, needs_codec_init, sample_partitions, server_steps,
    sync_round_state,
)
from .timing import TimingLog, exchange_timings
from .transport import Transport

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 120.0  # the least a new node gets to answer query.hello
# At most this many query.hello in flight at once. Flower 1.41's simulation engine checks
# every stored message for every node every 0.1 s, so 10 000 hellos sent together make
# each sweep O(nodes x nodes): docs/performance.md, "10 000 SuperNodes".
HELLO_BATCH = 256
Weights = dict[str, torch.Tensor]


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
    rejected: int = 0  # replies that failed validation (training and evaluation)
    timed_out: set[int] = field(default_factory=set)  # partitions with no reply by the deadline
    train_s: float = 0.0  # the exchanges and server steps only (no discovery, no evaluation)
    runtime_s: float = 0.0  # of train_s: the runtime's messaging cost (see RoundEngine._note_wait)
    client_compute_s: float = 0.0  # of train_s: the slowest client's compute, per exchange
    compute_s: float = 0.0  # train_s and the evaluation without the runtime's messaging cost: the server's and the slowest clients' compute
    sim_uplink_s: float = 0.0  # of sim_network_s: the uplink's share (docs/protocol.md, network model)
    sim_downlink_s: float = 0.0  # of sim_network_s: the downlink's share

    @property
    def accuracy(self) -> float:
        c, n = self.eval_counts.get("all", (0, 0))
        return c / n if n else float("nan")


def uplink_row(rnd: int, exchange: int, partition: int, kind: str, reply: Message) -> LedgerRow:
    """The ledger row of one reply: its information bytes, wire bytes and compressed-feature bytes."""
    content = reply.content
    samples = int(content.config_records["meta"].get("samples", 0)) if "meta" in content.config_records else 0
    return LedgerRow(rnd, exchange, reply.metadata.src_node_id, partition, "up", kind,
                     payload_bytes(content, UPLINK_INFO), wire_bytes(reply), samples,
                     payload_bytes(content, tuple(FEATURE_RECORDS.values())))


def guarded(fn, *args, **kwargs):
    """Run a validator/decoder on peer data: any exception is a :class:`WireError`, so a
    decoder bug on hostile input rejects the message instead of ending the run."""
    try:
        return fn(*args, **kwargs)
    except WireError:
        raise
    except Exception as err:  # noqa: BLE001 - hostile input must never crash the server
        log.error("decoder raised %s on peer data; treating it as invalid", type(err).__name__, exc_info=True)
        raise WireError(f"undecodable ({type(err).__name__}: {err})") from None


class RoundEngine:
    """Runs split rounds over a :class:`~sim.training.transport.Transport`.

    ``first_round`` and ``resumed_from`` continue a checkpointed run; ``on_round`` gets
    each finished round's :class:`RoundReport` (the ServerApp writes results and
    checkpoints there); ``evaluate_rounds=False`` skips the evaluation exchanges."""

    def __init__(
        self, cfg: SplitConfig, server: ServerRuntime, ledger: Ledger,
        on_round: Callable[[RoundReport], None] | None = None, first_round: int = 1, resumed_from: int = 0,
        evaluate_rounds: bool = True,
    ) -> None:
        self.cfg, self.server, self.ledger, self.on_round = cfg, server, ledger, on_round
        self.first_round, self.resumed_from, self.evaluate_rounds = first_round, resumed_from, evaluate_rounds
        self.partitions: dict[int, int] = {}  # partition id -> node id
        self._node_partition: dict[int, int] = {}  # node id -> partition id
        self.client_compute_s = 0.0  # per exchange, the slowest client's handler time, summed
        self.runtime_s = 0.0  # per exchange, wait minus that: the runtime's messaging cost, summed
        self.live: set[int] = set()  # partitions whose node the transport lists this round
        self.global_weights: Weights | None = None  # after the last finished round
        self.rejected_total = 0  # messages that failed validation, whole run
        self.ignored = 0  # replies from a node not asked, or second replies (counted as rejected)
        self._waited = False  # whether discovery has waited for expected-clients once
        self.dropped_total = 0  # (round, client) drops, whole run
        self.bad_records: dict[int, int] = {}  # partition -> records its data loader skipped
        self._weights = None  # name -> (dtype, shape) of the global client weights
        self.feedback: dict[int, ErrorFeedback] = {}  # partition -> its residuals (grad-error-feedback)
        self.timing: TimingLog | None = None  # where each reply's time went (timing.csv; sim/training/timing.py)
        llm_cfg = getattr(server.model, "llm", None)
        positions = getattr(getattr(llm_cfg, "config", None), "max_position_embeddings", None) or 65_535
        self._max_text = max(1, int(positions) - server.tokens)

    # ------------------------------------------------------------------ the run
    def run(self, transport: Transport, weights: Weights, num_rounds: int, timeout: float) -> Weights:
        """Rounds ``first_round..num_rounds``; returns the final global client weights."""
        weights = self.init_codecs(transport, weights, timeout)
        self.global_weights = weights
        for rnd in range(self.first_round, num_rounds + 1):
            t0, net0, ignored0 = time.perf_counter(), self.ledger.sim_network_s, self.ignored
            up0, down0 = self.ledger.sim_uplink_s, self.ledger.sim_downlink_s
            self.discover(transport, rnd, timeout)
            t_train, rt0, cc0 = time.perf_counter(), self.runtime_s, self.client_compute_s
            report, new_weights = self.train_round(transport, rnd, weights, timeout)
            report.train_s = time.perf_counter() - t_train
            report.runtime_s, report.client_compute_s = self.runtime_s - rt0, self.client_compute_s - cc0
            if new_weights is not None:
                weights = new_weights
            self.live -= report.timed_out  # not worth another timeout this round
            report.compute_s = report.train_s - report.runtime_s
            if self.evaluate_rounds:
                t_eval, rt_eval = time.perf_counter(), self.runtime_s
                self.evaluate_round(transport, rnd, weights, report, timeout)
                report.compute_s += (time.perf_counter() - t_eval) - (self.runtime_s - rt_eval)
            report.exchanges += 1
            report.rejected += self.ignored - ignored0
            self.global_weights = weights
            self.rejected_total += report.rejected
            report.wall_s = time.perf_counter() - t0
            report.sim_network_s = self.ledger.sim_network_s - net0
            report.sim_uplink_s = self.ledger.sim_uplink_s - up0
            report.sim_downlink_s = self.ledger.sim_downlink_s - down0
            if self.on_round is not None:
                self.on_round(report)
        return weights

    # ------------------------------------------------------------------ one round
    def round_requests(self, rnd: int, weights: Weights) -> list[Message]:
        """Exchange 0 of a round, to the sampled live clients: weights + config down,
        encode the first chunk."""
        apply, encode = exchange_schedule(self.cfg, rnd)[0]
        self._weights = weight_spec(weights)
        live = sorted(self.live)
        sampled = sample_partitions(live, self.cfg, rnd) if live else []
        return [
            Message(train_request(self.cfg, rnd, 0, apply, encode, False, weights=weights, resumed_from=self.resumed_from),
                    dst_node_id=self.partitions[p], message_type=TRAIN)
            for p in sampled
        ]

    def train_round(self, transport: Transport, rnd: int, weights: Weights, timeout: float) -> tuple[RoundReport, Weights | None]:
        """The exchanges of one round; returns its report and the FedAvg'd weights (None if
        no client finished, or if the client half is frozen this round: nothing changed)."""
        schedule = exchange_schedule(self.cfg, rnd)
        trains = self.cfg.client_trains_at(rnd)  # else no gradients go down and no weights come back
        self.feedback = {}  # every client starts a round without error-feedback residuals
        msgs = self.round_requests(rnd, weights)
        sampled = [self._partition_of(m.metadata.dst_node_id) for m in msgs]
        active = list(sampled)
        dropped: dict[int, str] = {}
        timed_out: set[int] = set()
        rejected, losses, aux, samples = 0, [], [], 0
        final_replies: list[Message] = []
        if len(sampled) < self.cfg.min_train_clients:
            log.warning("round %d skipped: %d clients sampled of %d live, min-train-clients is %d; "
                        "the global weights stay as they were", rnd, len(sampled), len(self.live), self.cfg.min_train_clients)
            schedule, dropped = [], {p: "round skipped: too few clients" for p in sampled}
        for e, (apply, encode) in enumerate(schedule):
            final = trains and e == len(schedule) - 1
            failed: dict[int, str] = {}
            replies = self._exchange(transport, msgs, rnd, e, TRAIN, timeout, failed)
            for p in list(active):
                if p not in replies:
                    dropped[p] = f"exchange {e}: {failed.get(p, 'no reply by the deadline')}"
                    if p not in failed:
                        timed_out.add(p)
                    active.remove(p)
            uploads: dict[int, TrainUpload] = {}
            for p in list(active):
                expect = Expect(round=rnd, exchange=e, partition=p, weights=self._weights, max_text_tokens=self._max_text)
                try:
                    uploads[p] = self._parse_train(replies[p].content, steps=len(encode), final=final, expect=expect)
                except WireError as err:
                    log.warning("round %d exchange %d: partition %d rejected: %s", rnd, e, p, err)
                    dropped[p] = f"exchange {e}: rejected: {err}"
                    rejected += 1
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
            try:
                step_losses, grads = server_steps(
                    self.server, rnd, encode, [uploads[p].y_hats for p in active], [uploads[p].texts for p in active]
                )
            except FloatingPointError as err:
                log.error("round %d stopped at exchange %d: %s; the global weights stay as they were", rnd, e, err)
                dropped.update({p: f"exchange {e}: round stopped: {err}" for p in active})
                break
            losses += step_losses
            samples += len(encode) * self.cfg.batch_size_at(rnd) * len(active)
            if e == len(schedule) - 1:  # a frozen round's last chunk: nothing to send back
                break
            nxt_apply, nxt_encode = schedule[e + 1]
            msgs = [
                Message(train_request(self.cfg, rnd, e + 1, nxt_apply, nxt_encode, trains and e + 1 == len(schedule) - 1,
                                      grads=grads[i] if trains else None,
                                      feedback=self._feedback(p)),
                        dst_node_id=self.partitions[p], message_type=TRAIN)
                for i, p in enumerate(active)
            ]
        new_weights = self.fedavg(rnd, final_replies)[0] if final_replies else None
        if dropped:
            log.warning("round %d: dropped clients %s", rnd, dropped)
        self.dropped_total += len(dropped)
        report = RoundReport(
            round=rnd, clients=sampled, dropped=dropped, step_losses=losses,
            client_aux=sum(aux) / len(aux) if aux else 0.0, eval_counts={}, exchanges=len(schedule),
            wall_s=0.0, sim_network_s=0.0, samples=samples, rejected=rejected, timed_out=timed_out,
        )
        return report, new_weights

    def fedavg(self, rnd: int, replies: Iterable[Message]) -> tuple[Weights | None, int]:
        """FedAvg of the final replies' client weights, weighted by local examples, with the
        codecs' synced state folded for the next round; and how many replies were valid
        (None and 0 if none is)."""
        ups = []
        for msg in replies:
            try:
                ups.append(self._parse_train(msg.content, steps=0, final=True, expect=Expect(weights=self._weights)))
            except WireError as err:
                log.warning("round %d: final reply rejected: %s", rnd, err)
        ups.sort(key=lambda u: u.partition)
        if not ups:
            return None, 0
        return sync_round_state(self.server, fedavg([u.weights for u in ups], [u.num_examples for u in ups])), len(ups)

    # ------------------------------------------------------------------ evaluation
    def eval_requests(self, rnd: int, weights: Weights) -> list[Message]:
        """Split inference on the live clients (``fraction-evaluate`` of them)."""
        live = sorted(self.live)
        chosen = sample_partitions(live, self.cfg, rnd, evaluation=True) if live else []
        return [Message(eval_request(self.cfg, rnd, weights), dst_node_id=self.partitions[p], message_type=EVALUATE)
                for p in chosen]

    def evaluate_round(self, transport: Transport, rnd: int, weights: Weights, report: RoundReport, timeout: float) -> None:
        """The evaluation exchange of round ``rnd``: its counts and failures go into ``report``."""
        msgs = self.eval_requests(rnd, weights)
        failed: dict[int, str] = {}
        replies = self._exchange(transport, msgs, rnd, report.exchanges, EVALUATE, timeout, failed)
        report.eval_counts = self.score_eval(rnd, replies.values(), report)
        for p in [self._partition_of(m.metadata.dst_node_id) for m in msgs]:
            if p not in replies or p in failed:
                report.dropped.setdefault(p, f"evaluation: {failed.get(p, 'no reply by the deadline')}")

    def parse_eval(self, rnd: int, partition: int, content: RecordDict) -> EvalUpload:
        """Validate and decode one evaluation reply of ``partition`` (raises :class:`WireError`)."""
        s = self.server
        expect = Expect(round=rnd, partition=partition, max_text_tokens=self._max_text)
        return guarded(parse_eval_reply, content, self.cfg, s.model.codecs(), s.tokens, s.dim, s.vocab_size, expect=expect)

    def score_eval(self, rnd: int, replies: Iterable[Message], report: RoundReport | None = None) -> dict[str, tuple[int, int]]:
        """(correct, total) over the valid evaluation replies, overall and per question type."""
        return self.score_contents(rnd, [(self._partition_of(m.metadata.src_node_id), m.content) for m in replies], report)

    def score_contents(
        self, rnd: int, contents: list[tuple[int, RecordDict]], report: RoundReport | None = None
    ) -> dict[str, tuple[int, int]]:
        """:meth:`score_eval` of ``(partition, reply content)`` pairs, in partition order."""
        totals: dict[str, list[int]] = {}
        for p, content in sorted(contents, key=lambda pc: pc[0]):
            try:
                up = self.parse_eval(rnd, p, content)
            except WireError as err:
                log.warning("round %d: eval reply of partition %d rejected: %s", rnd, p, err)
                if report is not None:
                    report.rejected += 1
                    report.dropped.setdefault(p, f"evaluation: rejected: {err}")
                continue
            self.bad_records[p] = up.bad_records
            for k, (c, n) in evaluate(self.server, up.y_hats, up.prompts, up.answers, up.qtypes, up.splits).items():
                t = totals.setdefault(k, [0, 0])
                t[0] += c
                t[1] += n
        return {k: (c, n) for k, (c, n) in totals.items()}

    # ------------------------------------------------------------------ codecs and nodes
    def init_codecs(self, transport: Transport, weights: Weights, timeout: float) -> Weights:
        """Before round 1: if the codecs' data-dependent state (AlignedVQ k-means codebook,
        RD-FSQ EMA statistics) is not initialised yet, the lowest known partition computes
        it from its own data (``query.init_codec``, ledger round 0). The result becomes
        part of the global client weights and the server halves load it."""
        if needs_codec_init(self.server, weights):
            self.discover(transport, 0, timeout)
            for p in sorted(self.partitions):
                msg = Message(init_request(self.cfg, weights), dst_node_id=self.partitions[p], message_type=INIT)
                reply = self._exchange(transport, [msg], 0, 0, INIT, timeout).get(p)
                try:
                    if reply is None:
                        raise WireError("no reply")
                    update = parse_init_reply(reply.content, self.cfg)
                    if set(update) - set(weights):
                        raise WireError(f"unknown codec state {sorted(set(update) - set(weights))[:3]}")
                    bad = [k for k, v in update.items() if v.shape != weights[k].shape or v.dtype != weights[k].dtype]
                    if bad:
                        raise WireError(f"codec state {bad[:3]} has the wrong shape or dtype")
                    candidate = {**weights, **update}
                    if needs_codec_init(self.server, candidate):
                        raise WireError("the returned codec state is still uninitialised")
                except WireError as err:
                    log.warning("codec initialisation by partition %d failed: %s", p, err)
                    continue
                weights = candidate
                log.info("codec state initialised from partition %d", p)
                break
            else:
                raise RuntimeError("no client could initialise the codec state (query.init_codec)")
        return sync_round_state(self.server, weights)

    def discover(self, transport: Transport, rnd: int, timeout: float) -> None:
        """List the live nodes and learn the partition id of every node not seen yet
        (``query.hello``). Only the first call waits for ``expected-clients`` nodes: later
        rounds go on with whoever is live rather than wait for one that died."""
        deadline = time.monotonic() + (0.0 if self._waited else timeout)
        self._waited = True
        want = max(1, self.cfg.expected_clients)
        node_ids = transport.node_ids()
        while len(node_ids) < want and time.monotonic() < deadline:
            time.sleep(0.2)  # nodes register with the SuperLink after the ServerApp starts
            node_ids = transport.node_ids()
        if len(node_ids) < want:
            log.warning("round %d: only %d of %d expected clients are connected", rnd, len(node_ids), want)
        new = sorted(node_ids - set(self.partitions.values()))
        msgs = [Message(hello_request(), dst_node_id=n, message_type=HELLO) for n in new]
        # A node's first message pays for starting its ClientApp (imports, a Ray actor or a
        # flwr-clientapp process); hello carries no work, so it may take longer than an exchange.
        hello_s = max(self.cfg.exchange_timeout_s, HELLO_TIMEOUT_S)
        replies: dict[int, Message] = {}
        for i in range(0, len(msgs), HELLO_BATCH):
            replies.update(self._exchange(transport, msgs[i:i + HELLO_BATCH], rnd, -1, HELLO, timeout,
                                          deadline_s=hello_s))
        for r in replies.values():
            node = r.metadata.src_node_id
            try:
                guarded(validate, r.content, hello_schema())
            except WireError as err:
                log.warning("node %d sent a bad hello: %s", node, err)
                self.rejected_total += 1
                continue
            p = r.content.config_records["meta"]["partition-id"]
            old = self.partitions.get(p)
            if old is not None and old != node and old in node_ids:
                log.warning("partition %d claimed by live nodes %d and %d; keeping the first", p, old, node)
                continue
            if old is not None and old != node:
                log.info("partition %d is back as node %d (was node %d)", p, node, old)
            self.partitions[p] = node
            self._node_partition[node] = p
        self.live = {p for p, n in self.partitions.items() if n in node_ids}
        if not self.partitions:
            raise RuntimeError("no client answered; is any SuperNode connected?")
        gone = sorted(set(self.partitions) - self.live)
        log.info("round %d: %d clients live%s", rnd, len(self.live), f", gone: {gone}" if gone else "")

    # ------------------------------------------------------------------ helpers
    def _parse_train(self, content: RecordDict, steps: int, final: bool, expect: Expect | None = None) -> TrainUpload:
        """Validate and decode a training reply; any failure is a :class:`WireError`."""
        s = self.server
        return guarded(parse_train_reply, content, self.cfg, s.model.codecs(), s.tokens, s.dim, s.vocab_size, s.pad_id,
                       steps, final, expect=expect)

    def _note_wait(self, wait_s: float, received: list[Message]) -> None:
        """Split an exchange's wait into the slowest client's own compute (``compute-s``
        in its reply) and the rest: the runtime's messaging cost (``runtime_s``)."""
        compute = []
        for r in received:
            v = r.content.config_records["meta"].get("compute-s") if not r.has_error() and "meta" in r.content.config_records else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
                compute.append(float(v))  # a malformed value is the schema's business, not a crash here
        slowest = max(compute, default=0.0)
        self.client_compute_s += slowest
        self.runtime_s += max(0.0, wait_s - slowest)

    def _feedback(self, partition: int) -> ErrorFeedback | None:
        """The error-feedback residuals of a client (``grad-error-feedback``), else None."""
        if not self.cfg.grad_error_feedback:
            return None
        return self.feedback.setdefault(partition, ErrorFeedback())

    def _partition_of(self, node_id: int) -> int:
        return self._node_partition.get(node_id, -1)

    def _exchange(
        self, transport: Transport, msgs: list[Message], rnd: int, exchange: int, kind: str, timeout: float,
        failed: dict[int, str] | None = None, deadline_s: float | None = None,
    ) -> dict[int, Message]:
        """Send ``msgs``, collect replies until ``exchange-timeout-s``; ledger rows for both
        directions (a reply that is later rejected is still a row: it was sent).

        Returns the usable replies keyed by partition id (node id for nodes not known
        yet). Error replies (the client raised, or the node is offline), replies from a
        node the message was not sent to and second replies are left out, with the
        reason in ``failed``."""
        failed = {} if failed is None else failed
        rows, sent = [], {}
        for m in msgs:
            p = self._partition_of(m.metadata.dst_node_id)
            sent[m.metadata.dst_node_id] = p
            rows.append(LedgerRow(rnd, exchange, m.metadata.dst_node_id, p, "down", kind,
                                  payload_bytes(m.content, DOWNLINK_INFO), wire_bytes(m)))
        replies: dict[int, Message] = {}
        t0 = time.perf_counter()
        received = transport.exchange(msgs, deadline_s or min(timeout, self.cfg.exchange_timeout_s))
        self._note_wait(time.perf_counter() - t0, received)
        if self.timing is not None:
            self.timing.record(exchange_timings(rnd, exchange, kind, received, getattr(transport, "last_arrivals", None),
                                                [self._partition_of(r.metadata.src_node_id) for r in received]))
        for r in received:
            node = r.metadata.src_node_id
            p = self._partition_of(node)
            key = p if p >= 0 else node
            if r.has_error():
                reason = f"error reply: {r.error.reason}"
                log.warning("round %d exchange %d: partition %d failed: %s", rnd, exchange, p, reason)
                failed[key] = reason
                continue
            rows.append(uplink_row(rnd, exchange, p, kind, r))
            if node not in sent or key in replies:
                log.warning("round %d exchange %d: rejected an unexpected or repeated reply from node %d", rnd, exchange, node)
                self.ignored += 1
                continue
            replies[key] = r
        down = [r for r in rows if r.direction == "down"]
        self.ledger.record_exchange(down + sorted((r for r in rows if r.direction == "up"), key=lambda r: (r.partition, r.node)))
        return replies

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """The run-long counters a checkpoint keeps (``sim/run/checkpoint.py``)."""
        return {"rejected_total": self.rejected_total, "dropped_total": self.dropped_total,
                "bad_records": dict(self.bad_records)}

    def load_state_dict(self, state: dict) -> None:
        self.rejected_total = int(state["rejected_total"])
        self.dropped_total = int(state["dropped_total"])
        self.bad_records = {int(k): int(v) for k, v in state["bad_records"].items()}
