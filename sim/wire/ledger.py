"""Communication ledger and network model.

Every message in both directions is one row: ``wire_bytes`` is what Flower
serialises for it (see :func:`sim.wire.wire_bytes`), ``payload_bytes`` its
information content (packed codes, side information, token ids, weights,
gradients). The network model charges each client, per exchange,
``rtt + down_bytes*8/downlink + up_bytes*8/uplink`` (``downlink-mbps`` and
``uplink-mbps``, each 0 by default: ``bandwidth-mbps`` for both, when the formula is
``rtt + bytes*8/bandwidth``); clients in one exchange run in parallel, so the exchange
takes the slowest client's time. That time is split into a downlink part (half the
round trip plus the request's bytes) and an uplink part (the other half plus the
reply's), those of the slowest client (docs/protocol.md, "Network model").
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
    """A client's link: ``bandwidth-mbps`` is the shorthand for both directions;
    ``uplink_mbps`` / ``downlink_mbps`` > 0 override it for one."""

    bandwidth_mbps: float
    rtt_ms: float
    uplink_mbps: float = 0.0
    downlink_mbps: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> NetworkModel:
        """The network model of a run config (``bandwidth-mbps``, ``rtt-ms``, ``uplink-mbps``, ``downlink-mbps``)."""
        return cls(cfg.bandwidth_mbps, cfg.rtt_ms, cfg.uplink_mbps, cfg.downlink_mbps)

    @property
    def up_mbps(self) -> float:
        return self.uplink_mbps or self.bandwidth_mbps

    @property
    def down_mbps(self) -> float:
        return self.downlink_mbps or self.bandwidth_mbps

    def client_seconds(self, wire_bytes: int) -> float:
        """One client's exchange on the symmetric link ``bandwidth-mbps``: ``rtt + bytes*8/bandwidth``."""
        return self.rtt_ms / 1000.0 + wire_bytes * 8 / (self.bandwidth_mbps * 1e6)

    def client_split(self, down_bytes: int, up_bytes: int) -> tuple[float, float, float]:
        """``(total, downlink, uplink)`` seconds of one client's exchange; each direction
        carries half the round trip. On a symmetric link the total is exactly
        :meth:`client_seconds` of all bytes (the formula before the directions were split)."""
        half = self.rtt_ms / 2000.0
        down_s = half + down_bytes * 8 / (self.down_mbps * 1e6)
        up_s = half + up_bytes * 8 / (self.up_mbps * 1e6)
        if self.up_mbps == self.down_mbps == self.bandwidth_mbps:
            return self.client_seconds(down_bytes + up_bytes), down_s, up_s
        return down_s + up_s, down_s, up_s

    def exchange_split(self, rows: list[LedgerRow]) -> tuple[float, float, float]:
        """``(total, downlink, uplink)`` seconds of one exchange's rows: the slowest client's."""
        per_node: dict[int, list[int]] = {}
        for r in rows:
            per_node.setdefault(r.node, [0, 0])[0 if r.direction == "down" else 1] += r.wire_bytes
        splits = [self.client_split(down, up) for down, up in per_node.values()]
        return max(splits, key=lambda t: t[0], default=(0.0, 0.0, 0.0))


def exchanges_of(rows: list[LedgerRow]) -> list[tuple[int, list[LedgerRow]]]:
    """The ledger rows grouped into exchanges (by round, exchange index and message kind,
    in order of appearance), as ``(round, rows)``. Repeated codec-initialisation attempts
    of round 0 fall into one group."""
    groups: dict[tuple[int, int, str], list[LedgerRow]] = {}
    for r in rows:
        groups.setdefault((r.round, r.exchange, r.kind), []).append(r)
    return [(key[0], g) for key, g in groups.items()]


def network_seconds_per_round(rows: list[LedgerRow], network: NetworkModel) -> dict[int, float]:
    """Simulated network seconds of each round's exchanges (round 0: the codec
    initialisation) under ``network``, recomputed from the ledger rows."""
    out: dict[int, float] = defaultdict(float)
    for rnd, group in exchanges_of(rows):
        out[rnd] += network.exchange_split(group)[0]
    return dict(out)


class Ledger:
    """Rows in memory, appended to ``ledger.csv`` as they come (nothing is lost on a crash)."""

    def __init__(self, network: NetworkModel, path: Path | None = None) -> None:
        self.network = network
        self.rows: list[LedgerRow] = []
        self.sim_network_s = 0.0
        self.sim_uplink_s = 0.0  # the slowest client's uplink share of each exchange, summed
        self.sim_downlink_s = 0.0  # and its downlink share
        self._path = path
        if path is not None:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def record_exchange(self, rows: list[LedgerRow]) -> float:
        """Add one exchange's rows; returns its simulated network time (max over clients)."""
        seconds, down_s, up_s = self.network.exchange_split(rows)
        self.sim_network_s += seconds
        self.sim_downlink_s += down_s
        self.sim_uplink_s += up_s
        self.rows.extend(rows)
        if self._path is not None:
            with self._path.open("a", newline="") as f:
                w = csv.writer(f)
                for r in rows:
                    w.writerow([getattr(r, c) for c in COLUMNS])
        return seconds

    def restore(self, rows: list[LedgerRow], sim_network_s: float, sim_uplink_s: float | None = None,
                sim_downlink_s: float | None = None) -> None:
        """Start from a checkpoint's rows (``ledger.csv`` is rewritten to hold exactly them);
        the uplink and downlink shares are recomputed from the rows when not given."""
        self.rows, self.sim_network_s = list(rows), sim_network_s
        if sim_uplink_s is None or sim_downlink_s is None:
            splits = [self.network.exchange_split(g) for _, g in exchanges_of(self.rows)]
            sim_downlink_s, sim_uplink_s = sum(s[1] for s in splits), sum(s[2] for s in splits)
        self.sim_uplink_s, self.sim_downlink_s = sim_uplink_s, sim_downlink_s
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

