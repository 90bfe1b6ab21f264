"""The run directory: config, per-round metrics, per-step losses, summary and plots.

Everything is written as it is produced (metrics.csv and steps.csv are appended each
round, summary.json is rewritten atomically), so a crash never loses finished
rounds. Plots are generated from the CSV files at the end with matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sim.config import SplitConfig  # noqa: E402
from sim.training.feature_dp import feature_dp_summary  # noqa: E402
from sim.wire.ledger import Ledger, LedgerRow, NetworkModel, network_seconds_per_round  # noqa: E402

METRIC_COLUMNS = (
    "round", "accuracy", "train_loss", "client_aux_loss", "clients", "dropped", "rejected", "samples",
    "uplink_bytes", "downlink_bytes", "exchanges", "wall_s", "train_s", "runtime_s", "client_compute_s", "compute_s",
    "sim_network_s", "sim_uplink_s", "sim_downlink_s", "acc_colour", "acc_shape", "acc_count", "acc_position", "acc_relational", "acc_llava",
)


def resolve_run_dir(cfg: SplitConfig) -> Path:
    """``out-dir/run-name``; an empty run name becomes ``<time>-<compressor>-b<bits>``."""
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.compressor}-b{cfg.bits}"
    return (Path(cfg.out_dir).expanduser() / name).resolve()


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


class RunRecorder:
    """Writes the run directory as rounds complete."""

    def __init__(self, run_dir: Path, cfg: SplitConfig, clients: int) -> None:
        self.dir = run_dir
        self.cfg = cfg
        self.clients = clients
        self.t0 = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "summary.json").exists():
            raise FileExistsError(f"{run_dir} already holds a finished run; choose another out-dir/run-name")
        write_json_atomic(run_dir / "config.json", cfg.to_run_config())
        with (run_dir / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerow(METRIC_COLUMNS)
        with (run_dir / "steps.csv").open("w", newline="") as f:
            csv.writer(f).writerow(("round", "step", "loss"))

    def round(self, report, ledger: Ledger) -> dict:
        totals = ledger.totals(report.round)
        row = {
            "round": report.round,
            "accuracy": report.accuracy,
            "train_loss": report.step_losses[-1] if report.step_losses else float("nan"),
            "client_aux_loss": report.client_aux,
            "clients": len(report.clients),
            "dropped": ";".join(f"{p}:{why}" for p, why in sorted(report.dropped.items())),
            "rejected": report.rejected,
            "samples": report.samples,
            "uplink_bytes": totals["uplink_bytes"],
            "downlink_bytes": totals["downlink_bytes"],
            "exchanges": report.exchanges,
            "wall_s": round(report.wall_s, 4),
            "train_s": round(report.train_s, 4),
            "runtime_s": round(report.runtime_s, 4),
            "client_compute_s": round(report.client_compute_s, 4),
            "compute_s": round(report.compute_s, 4),
            "sim_network_s": round(report.sim_network_s, 6),
            "sim_uplink_s": round(report.sim_uplink_s, 6),
            "sim_downlink_s": round(report.sim_downlink_s, 6),
        }
        for q in ("colour", "shape", "count", "position", "relational", "llava"):
            c, n = report.eval_counts.get(q, (0, 0))
            row[f"acc_{q}"] = c / n if n else ""
        with (self.dir / "metrics.csv").open("a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in METRIC_COLUMNS])
        base = (report.round - 1) * self.cfg.local_steps
        with (self.dir / "steps.csv").open("a", newline="") as f:
            csv.writer(f).writerows((report.round, base + i, f"{x:.9g}") for i, x in enumerate(report.step_losses))
        return row

    def finish(self, ledger: Ledger, extra: dict | None = None) -> dict:
        metrics = pd.read_csv(self.dir / "metrics.csv")
        totals = ledger.totals()
        samples = int(metrics["samples"].sum()) if len(metrics) else 0
        train_up = [r for r in ledger.rows if r.direction == "up" and r.kind == "train.split_step" and r.samples]
        up_samples = sum(r.samples for r in train_up)
        summary = {
            "accuracy": float(metrics["accuracy"].iloc[-1]) if len(metrics) else float("nan"),
            "best_accuracy": float(metrics["accuracy"].max()) if len(metrics) else float("nan"),
            "rounds": int(len(metrics)),
            "clients": self.clients,
            "compressor": self.cfg.compressor,
            "bits": self.cfg.bits,
            **totals,
            "uplink_bytes_per_sample": sum(r.wire_bytes for r in train_up) / up_samples if up_samples else float("nan"),
            "uplink_payload_bytes_per_sample": (
                sum(r.payload_bytes for r in train_up) / up_samples if up_samples else float("nan")
            ),
            "uplink_feature_bytes_per_sample": (
                sum(r.feature_bytes for r in train_up) / up_samples if up_samples else float("nan")
            ),
            "samples_seen": samples,
            "wall_s": round(time.perf_counter() - self.t0, 3),
            "sim_network_s": round(ledger.sim_network_s, 6),
            "sim_uplink_s": round(ledger.sim_uplink_s, 6),
            "sim_downlink_s": round(ledger.sim_downlink_s, 6),
            "compute_s": round(float(metrics["compute_s"].sum()), 3) if "compute_s" in metrics else 0.0,
            "messages": len(ledger.rows),
        }
        summary["sim_total_s"] = round(summary["compute_s"] + ledger.sim_network_s, 3)
        summary["time_to_accuracy_s"] = time_to_accuracy(metrics, ledger.rows, self.cfg.rtt_ms)
        summary.update(feature_dp_summary(self.cfg, self.clients))  # (ε, δ) of feature-noise, docs/privacy.md
        summary.update(extra or {})
        write_json_atomic(self.dir / "summary.json", summary)
        plot_run(self.dir)
        return summary


TTA_BANDWIDTHS_MBPS = (1, 10, 100)  # symmetric links the summary's time-to-accuracy is given at
TTA_FRACTIONS = (90, 95, 99)  # per cent of the final accuracy


def simulated_clock(rounds: list[int], computes: list[float], rows: list[LedgerRow], network: NetworkModel) -> list[float]:
    """The simulated time at the end of each round: the rounds' measured compute plus their
    exchanges' network time under ``network``, recomputed from the ledger rows; the clock
    starts before the codec initialisation (round 0: its network time counts)."""
    net = network_seconds_per_round(rows, network)
    return round_end_clock(net.get(0, 0.0), computes, [net.get(int(r), 0.0) for r in rounds])


def round_end_clock(start_s: float, computes: list[float], network_s: list[float]) -> list[float]:
    """The simulated time at the end of each round from ``start_s`` (the codec
    initialisation's network time): each round adds its compute and its network seconds."""
    clock, elapsed = start_s, []
    for compute, net in zip(computes, network_s):
        clock += float(compute) + net
        elapsed.append(clock)
    return elapsed


def time_to_accuracy(
    metrics: pd.DataFrame, rows: list[LedgerRow], rtt_ms: float,
    bandwidths: tuple[float, ...] = TTA_BANDWIDTHS_MBPS, fractions: tuple[int, ...] = TTA_FRACTIONS,
) -> dict[str, dict[str, float | None]]:
    """Simulated seconds until the accuracy first reaches ``X %`` of the final accuracy, on
    a symmetric link of each bandwidth (Mbit/s, ``rtt_ms`` round trip), from one run:
    ``{"10mbps": {"90pct": s, ...}, ...}``.

    A round's simulated time is its measured compute (``compute_s`` of metrics.csv) plus
    its exchanges' network time recomputed from the ledger rows at that bandwidth; the
    clock starts before the codec initialisation (round 0: its network time counts, its
    compute is not measured) and a round's accuracy is read at its end. None when the
    final accuracy is not a positive number."""
    out: dict[str, dict[str, float | None]] = {}
    acc = [float(a) for a in metrics["accuracy"]] if len(metrics) else []
    final = acc[-1] if acc else math.nan
    computes = metrics["compute_s"] if "compute_s" in metrics else [0.0] * len(metrics)
    for bw in bandwidths:
        elapsed = simulated_clock(list(metrics["round"]), list(computes), rows, NetworkModel(float(bw), rtt_ms))
        key = f"{bw:g}mbps"
        out[key] = {}
        for pct in fractions:
            hit = None
            if math.isfinite(final) and final > 0:
                hit = next((round(t, 3) for a, t in zip(acc, elapsed) if a >= pct / 100 * final), None)
            out[key][f"{pct}pct"] = hit
    return out


def plot_run(run_dir: Path) -> None:
    """accuracy.png (exact match per round) and bytes.png (cumulative bytes per direction)."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    ledger = pd.read_csv(run_dir / "ledger.csv")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(metrics["round"], 100 * metrics["accuracy"], marker="o")
    ax.set(xlabel="round", ylabel="exact match on local test sets (%)", ylim=(0, 100), title="Accuracy per round")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for direction, label in (("up", "uplink"), ("down", "downlink")):
        d = ledger[ledger["direction"] == direction].groupby("round")["wire_bytes"].sum().cumsum()
        ax.plot(d.index, d.values / 1e6, marker="o", label=label)
    ax.set(xlabel="round", ylabel="cumulative wire bytes (MB)", title="Communication")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "bytes.png", dpi=120)
    plt.close(fig)
