"""Where an exchange's time goes: each reply's own start-up and work, and the server's wait.

Flower 1.41's deployment runtime handles every message a SuperNode receives in a fresh
``flwr-clientapp`` process (``flwr/supernode/runtime/run_clientapp.py``: pull the task,
install the FAB, load the ClientApp, handle one message, exit); docs/deployment.md
("Cost on loopback") and docs/performance.md have the measurements. The app times that
itself, without patching Flower. A client's parts (:data:`~sim.wire.messages.CLIENT_TIMING`),
in the order they happen::

    process created --start--> Flower's first thread --load--> first line of clients/client_app.py
      --import-torch, import-transformers, import-project--> handler --rebuild--> --compute--> reply

* ``start``: the process's creation (``/proc/self/stat``) to the first thread that
  ``run_clientapp`` starts (its parent-process monitor, else its heartbeat;
  ``/proc/self/task/<tid>/stat``): the interpreter, ``import flwr`` and argument parsing;
* ``load``: that thread to the first line of the ClientApp module: pulling the message,
  context and FAB from the SuperNode, installing the FAB (extracted and hashed even when
  it is installed already) and locating the app;
* ``import-*``: the ClientApp module's own imports, timed where they happen;
* ``rebuild``: the handler's restore of the client runtime (model, tokenizer and data are
  built once per process, so in deployment on every message) and of its weights and
  optimiser state from ``context.state``;
* ``compute``: the rest of the handler (its ``compute-s`` is ``rebuild + compute``).

Every reply carries them as meta ``timing-s`` (a fixed-length list, so the ledger counts
the same bytes in every runtime). The start-up parts go with the first message a process
handles and are 0 after it; ``start`` and ``load`` are 0 outside a ``flwr-clientapp``
process (a Ray worker or the in-process transport is not started for a message).

The server adds what it sees of each reply (:class:`MessageTiming`, one row of the run
directory's ``timing.csv``): ``superlink`` is its own calls to the SuperLink that carried
the message and the reply (the exchange's push, the pull that returned the reply);
``waiting`` is the rest of the time from the push to the reply that the client did not
report: the SuperNode's pull interval (3 s when idle), SuperExec's task poll, the
process's spawn, exit and upload of the reply, the SuperNode's 0.5 s reply poll and the
ServerApp's own poll interval. For the exchange's last reply, ``start + load + imports +
rebuild + compute + superlink + waiting`` is the exchange's wait.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from flwr.app import Message

from sim.wire.messages import CLIENT_TIMING, TIMING_KEY

from .startup import CLIENTAPP_COMMAND, process_start

STARTUP_PARTS = len(CLIENT_TIMING) - 2  # all but rebuild and compute


# ----------------------------------------------------------------------------- client side
@dataclass
class _Startup:
    """This process's start-up, charged to the first message it handles."""

    parts: tuple[float, ...] = (0.0,) * STARTUP_PARTS
    charged: bool = True  # nothing to charge until the ClientApp module was imported


_STARTUP = _Startup()  # one per process: a process starts up once, whichever client it serves


def mark_clientapp_import(first_line: float, after_torch: float, after_transformers: float, done: float) -> None:
    """With ``time.time()`` at the ClientApp module's first line and after each group of
    its imports (torch, transformers, the project), done one after the other."""
    mark_startup(first_line, (after_torch - first_line, after_transformers - after_torch, done - after_transformers))


def mark_startup(first_line: float, imports: tuple[float, float, float]) -> None:
    """This process's start-up, charged to the next reply: ``(start, load)`` up to
    ``first_line`` (the ClientApp module's first line, ``time.time()``) and the seconds of
    its ``imports`` of torch, transformers and the project (``clients/client_app.py``
    imports them on its first local message, :mod:`sim.training.site_worker` never)."""
    start, load = process_start(first_line) if Path(sys.argv[0]).name == CLIENTAPP_COMMAND else (0.0, 0.0)
    _STARTUP.parts = tuple(max(0.0, x) for x in (start, load, *imports))
    _STARTUP.charged = False


def client_timing(rebuild_s: float, compute_s: float) -> list[float]:
    """A reply's ``timing-s``: this process's start-up (first message only) and the handler's parts."""
    startup = (0.0,) * STARTUP_PARTS
    if not _STARTUP.charged:
        startup, _STARTUP.charged = _STARTUP.parts, True
    return [float(x) for x in (*startup, rebuild_s, compute_s)]


# ----------------------------------------------------------------------------- server side
@dataclass(frozen=True)
class Arrivals:
    """What a transport measured of one exchange: its push call, and for each reply it
    returned (same order) the time from the push to the end of the pull that returned it
    and that pull call's own duration."""

    push_s: float
    arrivals: list[tuple[float, float]]


@dataclass(frozen=True)
class MessageTiming:
    """One reply's row of ``timing.csv`` (seconds)."""

    round: int
    exchange: int
    kind: str
    partition: int
    node: int
    last: bool  # the exchange's last reply: its row decomposes the exchange
    exchange_s: float  # the exchange's wait: the push to its last reply
    wait_s: float  # the push to this reply
    start_s: float
    load_s: float
    import_torch_s: float
    import_transformers_s: float
    import_project_s: float
    rebuild_s: float
    compute_s: float
    superlink_s: float
    waiting_s: float  # wait_s minus everything above it: can be < 0 only if a client over-reports


TIMING_COLUMNS = tuple(f.name for f in fields(MessageTiming))
COMPONENTS = TIMING_COLUMNS[TIMING_COLUMNS.index("start_s"):]  # they sum to wait_s


def reported_parts(reply: Message) -> tuple[float, ...]:
    """The client's ``timing-s``; zeros when it is missing or malformed (the schema rejects
    such a reply later; timing must not fail first)."""
    zeros = (0.0,) * len(CLIENT_TIMING)
    if reply.has_error() or "meta" not in reply.content.config_records:
        return zeros
    v = reply.content.config_records["meta"].get(TIMING_KEY)
    if not isinstance(v, list) or len(v) != len(CLIENT_TIMING):
        return zeros
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x for x in v)
    return tuple(float(x) for x in v) if ok else zeros


def exchange_timings(rnd: int, exchange: int, kind: str, replies: list[Message], measured: Arrivals | None,
                     partitions: list[int]) -> list[MessageTiming]:
    """The rows of one exchange's replies (``partitions[i]`` is reply ``i``'s partition);
    none when the transport measured nothing for them."""
    if measured is None or len(measured.arrivals) != len(replies) or not replies:
        return []
    total = max(w for w, _ in measured.arrivals)
    last = max(range(len(replies)), key=lambda i: measured.arrivals[i][0])
    rows = []
    for i, (reply, (wait, pull)) in enumerate(zip(replies, measured.arrivals)):
        client = reported_parts(reply)
        superlink = measured.push_s + pull
        rows.append(MessageTiming(rnd, exchange, kind, partitions[i], reply.metadata.src_node_id, i == last, total, wait,
                                  *client, superlink, wait - superlink - sum(client)))
    return rows


class TimingLog:
    """``timing.csv``: one row per reply, appended as the exchanges happen. It holds the
    replies this ServerApp process received (a resumed run starts it afresh)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(TIMING_COLUMNS)

    def record(self, rows: list[MessageTiming]) -> None:
        if rows:
            with self.path.open("a", newline="") as f:
                csv.writer(f).writerows(_csv_row(r) for r in rows)


def _csv_row(r: MessageTiming) -> list:
    return [f"{v:.6f}" if isinstance(v, float) else v for v in astuple(r)]
