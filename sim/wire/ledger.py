"""Communication ledger and network model.

Every message in both directions is one row: ``wire_bytes`` is what Flower
serialises for it (see :func:`sim.wire.wire_bytes`), ``payload_bytes`` its
information content (packed codes, side information, token ids, weights,
gradients). The network model charges each client ``rtt + bytes*8/bandwidth`` per
exchange (downlink plus uplink); clients in one exchange run in parallel, so the
exchange takes the slowest client's time.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class LedgerRow:
    round: int
    exchange: int
    node: int
    partition: int
    direction: str  # "up" (client -> server) or "down"
    kind: str  # message type, e.g. "train.split_step"
    payload_bytes: int
    wire_bytes: int
    samples: int = 0  # training samples whose features this message carries
    feature_bytes: int = 0  # the part of payload_bytes that is compressed features


COLUMNS = tuple(f.name for f in fields(LedgerRow))


@dataclass(frozen=True)
class NetworkModel:
    bandwidth_mbps: float
    rtt_ms: float

    def client_seconds(self, wire_bytes: int) -> float:
        return self.rtt_ms / 1000.0 + wire_bytes * 8 / (self.bandwidth_mbps * 1e6)


class Ledger:
    """Rows in memory, appended to ``ledger.csv`` as they come (nothing is lost on a crash)."""

    def __init__(self, network: NetworkModel, path: Path | None = None) -> None:
        self.network = network
        self.rows: list[LedgerRow] = []
        self.sim_network_s = 0.0
        self._path = path
        if path is not None:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def record_exchange(self, rows: list[LedgerRow]) -> float:
        """Add one exchange's rows; returns its simulated network time (max over clients)."""
        per_node: dict[int, int] = defaultdict(int)
        for r in rows:
            per_node[r.node] += r.wire_bytes
        seconds = max((self.network.client_seconds(b) for b in per_node.values()), default=0.0)
        self.sim_network_s += seconds
        self.rows.extend(rows)
        if self._path is not None:
            with self._path.open("a", newline="") as f:
                w = csv.writer(f)
                for r in rows:
                    w.writerow([getattr(r, c) for c in COLUMNS])
        return seconds

    def restore(self, rows: list[LedgerRow], sim_network_s: float) -> None:
        """Start from a checkpoint's rows (``ledger.csv`` is rewritten to hold exactly them)."""
        self.rows, self.sim_network_s = list(rows), sim_network_s
        if self._path is not None:
            with self._path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(COLUMNS)
                w.writerows([getattr(r, c) for c in COLUMNS] for r in self.rows)

    def totals(self, round_: int | None = None) -> dict[str, int]:
        rows = [r for r in self.rows if round_ is None or r.round == round_]
        out = {
            "uplink_bytes": sum(r.wire_bytes for r in rows if r.direction == "up"),
            "downlink_bytes": sum(r.wire_bytes for r in rows if r.direction == "down"),
            "uplink_payload_bytes": sum(r.payload_bytes for r in rows if r.direction == "up"),
            "downlink_payload_bytes": sum(r.payload_bytes for r in rows if r.direction == "down"),
        }
        return out

