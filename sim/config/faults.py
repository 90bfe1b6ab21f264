"""Fault injection for reliability tests (run-config key ``fault-inject``; off by default).

A spec is a ``;``-separated list of faults, each ``KIND@PARTITION:ROUND:EXCHANGE`` with
an optional ``:SECONDS`` for ``delay``::

    raise@1:1:2          partition 1 raises in round 1, training exchange 2
    delay@0:2:1:30       partition 0 sleeps 30 s before handling round 2, exchange 1
    raise@2:1:eval       partition 2 raises on round 1's evaluation request

``EXCHANGE`` is a training exchange index (0 = the one that carries the global
weights) or ``eval``. ``raise`` makes the ClientApp raise :class:`InjectedFault`, which
Flower turns into an error reply (``Message.has_error()``); ``delay`` holds the reply
back, so with ``SECONDS`` above ``exchange-timeout-s`` the client misses the exchange
as a crashed or unreachable one would. A SuperNode that disappears is tested by
killing its process (tests/test_deployment.py), not by this knob.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

KINDS = ("raise", "delay")
EVAL = -1  # EXCHANGE value of ``eval``


class InjectedFault(RuntimeError):
    """Raised by a ClientApp on purpose (``fault-inject``)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    partition: int
    round: int
    exchange: int  # training exchange index, or EVAL
    seconds: float = 0.0


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """Parse a ``fault-inject`` spec; raises ``ValueError`` naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, sep, where = part.partition("@")
        fields = where.split(":")
        if not sep or kind not in KINDS or len(fields) not in (3, 4) or (len(fields) == 4) != (kind == "delay"):
            raise ValueError(
                f"fault {part!r} is not KIND@PARTITION:ROUND:EXCHANGE (delay: ...:SECONDS), KIND one of {', '.join(KINDS)}"
            )
        try:
            partition, rnd = int(fields[0]), int(fields[1])
            exchange = EVAL if fields[2] == "eval" else int(fields[2])
            seconds = float(fields[3]) if kind == "delay" else 0.0
        except ValueError:
            raise ValueError(f"fault {part!r}: partition, round and exchange must be integers (or 'eval')") from None
        if partition < 0 or rnd < 1 or exchange < EVAL or not 0 <= seconds <= 86_400:
            raise ValueError(f"fault {part!r}: out of range (partition >= 0, round >= 1, 0 <= seconds <= 86400)")
        faults.append(Fault(kind, partition, rnd, exchange, seconds))
    return tuple(faults)


def inject(spec: str, partition: int, rnd: int, exchange: int) -> None:
    """Called by the ClientApp before it handles a request: apply a matching fault."""
    if not spec:
        return
    for f in parse_faults(spec):
        if (f.partition, f.round, f.exchange) != (partition, rnd, exchange):
            continue
        where = f"partition {partition}, round {rnd}, exchange {'eval' if exchange == EVAL else exchange}"
        if f.kind == "delay":
            log.warning("fault-inject: delaying %s by %.1f s", where, f.seconds)
            time.sleep(f.seconds)
        else:
            raise InjectedFault(f"fault-inject: {where}")
