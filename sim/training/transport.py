"""How the round engine reaches its clients: Flower's ``Grid``, or this process.

The round engine (:mod:`sim.training.engine`) builds Flower ``Message`` objects and hands
them to a :class:`Transport`, which returns the replies that arrived in time:

* :class:`FlowerTransport` — Flower's ``Grid`` (the Ray simulation, or a SuperLink in
  deployment): push everything, then poll until each message has a reply or the deadline
  passes;
* :class:`InProcessTransport` — every message goes straight to the client's handler
  (:data:`sim.training.client_handlers.HANDLERS`) in this process, with a per-client
  ``state`` standing in for Flower's ``context.state``. The reference trainer, the
  experiments and the privacy study use it.

Both run the same handlers on the same records, so a run is the same run either way. One
thing must match for the floating-point results to match too: the number of torch
threads the client code runs with. Ray starts each simulated client with
``OMP_NUM_THREADS = floor(client-cpus)`` (at least 1), so its torch uses that many
threads, while the server keeps the process's default. The in-process transport runs
its clients with the same count (:func:`client_threads`); with another count, the
reductions inside the client's forward and backward split differently and the two runs
drift apart by ~1e-7 per step, ~1e-4 after a round (docs/architecture.md).

Semantics of a Flower exchange (checked against the installed flwr 1.41 source), which
the in-process transport reproduces:

* a ClientApp that raises comes back as a reply with ``has_error()``;
* a message to a node the SuperLink has marked offline comes back as an error reply;
* a node that is alive but slow has no reply by the deadline, and its late reply is
  never pulled (in-process: a handler that took longer than the deadline).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Protocol

import torch
from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from .client_handlers import HANDLERS
from .node import NodeIdentity
from .timing import Arrivals

# Flower 1.41's deployment grid (``HttpGrid``) sleeps a fixed 3 s between polls, which is
# most of an exchange on loopback; the simulation's ``InMemoryGrid`` has ``pull_interval``.
DEPLOYMENT_POLL_S = 0.1
CLIENT_ERROR = 1  # Error code of a reply whose handler raised (Flower uses its own codes)


class Transport(Protocol):
    """Where the clients are."""

    def node_ids(self) -> set[int]:
        """The nodes that are connected now."""

    def exchange(self, messages: list[Message], timeout_s: float) -> list[Message]:
        """Send ``messages``; return the replies that arrived within ``timeout_s``, and keep
        in ``last_arrivals`` when each arrived (:class:`~sim.training.timing.Arrivals`)."""


class FlowerTransport:
    """Flower's ``Grid``: the Ray simulation or a SuperLink."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.last_arrivals: Arrivals | None = None

    def node_ids(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def exchange(self, messages: list[Message], timeout_s: float) -> list[Message]:
        """Push ``messages``; pull replies until each has one or ``timeout_s`` has passed
        (``Grid.send_and_receive`` does the same, with a fixed 3 s poll in deployment).
        ``last_arrivals`` then holds the push's and each reply's pull's timing."""
        poll = float(getattr(self.grid, "pull_interval", DEPLOYMENT_POLL_S))
        t0 = time.perf_counter()
        pending = {i for i in self.grid.push_messages(list(messages)) if i}
        push_s = time.perf_counter() - t0
        deadline = time.monotonic() + timeout_s
        replies: list[Message] = []
        arrivals: list[tuple[float, float]] = []
        while pending:
            t_pull = time.perf_counter()
            got = list(self.grid.pull_messages(pending))
            now = time.perf_counter()
            replies += got
            arrivals += [(now - t0, now - t_pull)] * len(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        self.last_arrivals = Arrivals(push_s, arrivals)
        return replies


def client_threads(client_cpus: float) -> int:
    """The torch threads of a simulated client: Ray's ``OMP_NUM_THREADS`` for an actor
    with ``client-cpus`` CPUs (``ray._private.utils.set_omp_num_threads_if_unset``)."""
    return max(1, math.floor(client_cpus))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ensure_task_identity() -> None:
    """Flower stamps run, task and node ids into every Message; outside a Flower run they
    are unset, so set placeholders (1) for the unset ones (small integers in the
    metadata, as in a real run)."""
    for attr in ("run_id", "task_id", "node_id"):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, 1)


class InProcessTransport:
    """Clients in this process: partition ``p`` is node ``p + 1`` with its own state.

    ``threads`` is the torch thread count the client handlers run with (the reference
    passes what a Ray simulation gives each client, :func:`client_threads`); ``state_dir``
    is where the clients keep their optimiser checkpoints (``--node-config state-dir``;
    empty: the run directory). ``connected`` can be narrowed to mimic nodes that left."""

    def __init__(self, num_partitions: int, threads: int = 1, state_dir: str = "") -> None:
        ensure_task_identity()
        self.nodes = {p + 1: NodeIdentity(p, num_partitions, state_dir=state_dir) for p in range(num_partitions)}
        self.states: dict[int, RecordDict] = {n: RecordDict() for n in self.nodes}
        self.connected = set(self.nodes)
        self.threads = threads
        self.last_arrivals: Arrivals | None = None

    def node_ids(self) -> set[int]:
        return set(self.connected)

    def exchange(self, messages: list[Message], timeout_s: float) -> list[Message]:
        """The handlers one after another; a reply arrives when its handler returns."""
        t0, replies, arrivals = time.perf_counter(), [], []
        for m in messages:
            reply = self._handle(m, timeout_s)
            if reply is not None:
                replies.append(reply)
                arrivals.append((time.perf_counter() - t0, 0.0))
        self.last_arrivals = Arrivals(0.0, arrivals)
        return replies

    def _handle(self, msg: Message, timeout_s: float) -> Message | None:
        node = msg.metadata.dst_node_id
        if node not in self.connected:
            return Message(Error(CLIENT_ERROR, f"node {node} is not connected"), reply_to=msg)
        t0 = time.perf_counter()
        try:
            with torch_threads(self.threads):
                content = HANDLERS[msg.metadata.message_type](msg.content, self.states[node], self.nodes[node])
            reply = Message(content, reply_to=msg)
        except Exception as err:  # noqa: BLE001 - as Flower does, a raising handler is an error reply
            reply = Message(Error(CLIENT_ERROR, f"{type(err).__name__}: {err}"), reply_to=msg)
        return reply if time.perf_counter() - t0 <= timeout_s else None  # late: never pulled

