"""Both directions: accuracy against total bytes per training sample, for pairs of an uplink
feature codec and a downlink gradient codec (issue 17; docs/compressors.md).

``python -m experiments.traffic`` trains the project's default job (split fine-tuning of
the shipped checkpoint, ``sim/config/keys.py``) once per (pair, seed) with the in-process
reference trainer (the round engine of the Flower strategy; its ledger counts the messages
the Flower run sends) and measures, from that run's own ledger:

* **total bytes per training sample**: every message of the run in both directions as
  Flower serialises it (codes, text, gradients, the global weights down and the updated
  weights up, the codec initialisation and every round's evaluation) divided by the
  training samples the server stepped on;
* exact match after the last round, paired by seed against the identity baseline (fp16 up,
  fp32 down): mean ± standard error of the per-seed differences;
* **time to accuracy**: simulated seconds (measured compute + the ledger's bytes on a
  symmetric link of 1, 10 and 100 Mbit/s, :func:`sim.run.results.round_end_clock`) until a
  run first reaches :data:`TARGET_FRACTION` of the baseline's mean final accuracy.

Data flow::

    PAIRS x seeds --run_grid (resumable, --jobs processes)--> traffic.csv (one row per run)
    traffic.csv --report--> traffic.md (table, best ratios at <= 1 and <= 3 points), traffic.png (Pareto)

The downlink codecs are the gradient-stream plugins (``grad-compressor``); ``frozen`` is the
no-gradient mode (``client-finetune=frozen``: after the align round the client half stays
fixed, no gradients go down and no weights come back). ``--quick`` runs a few steps of two
pairs for CI; its accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sim.run.cli import parse_overrides  # noqa: E402
from sim.run.results import round_end_clock  # noqa: E402

from .common import add_table_row, mean_std, run_grid, setup_logging, table_cell  # noqa: E402

log = logging.getLogger("experiments.traffic")

RESULTS = Path("experiments/results")
CLIENTS = 4  # the default run's (`python -m sim run --clients 4`, README)
SEEDS = (0, 1, 2)
BANDWIDTHS_MBPS = (1, 10, 100)
TARGET_RATIO = 32.0  # issue 17's target: total traffic per training sample this far below the baseline
TARGET_FRACTION = 0.95  # time to accuracy: to this fraction of the baseline's mean final accuracy

# The codecs of each direction, as run-config overrides (their keys: `python -m sim codecs`).
UPLINK: dict[str, dict[str, object]] = {
    "fp16": {"compressor": "identity", "bits": 16},
    "rdfsq2": {"compressor": "rdfsq", "bits": 2},
    "rdfsq1": {"compressor": "rdfsq", "bits": 1},
    "rdfsq2+ans": {"compressor": "rdfsq", "bits": 2, "entropy-coding": "ans"},
    "rdfsq1+ans": {"compressor": "rdfsq", "bits": 1, "entropy-coding": "ans"},
}
DOWNLINK: dict[str, dict[str, object]] = {
    "fp32": {"grad-compressor": "none"},
    "bf16": {"grad-compressor": "bf16"},
    "sr4": {"grad-compressor": "stochastic", "grad-bits": 4},
    "sr2": {"grad-compressor": "stochastic", "grad-bits": 2},
    "lowrank4": {"grad-compressor": "lowrank", "lowrank-rank": 4},
    "frozen": {"client-finetune": "frozen"},
    # frozen after the align round, whose gradients (one round of eight) then go down as rank-4 factors
    "lowrank4+frozen": {"grad-compressor": "lowrank", "lowrank-rank": 4, "client-finetune": "frozen"},
}
BASELINE = ("fp16", "fp32")
# The grid: not the full cross product (35 pairs x 3 seeds would take ~3.5 hours here). The
# baseline, the default uplink with every downlink codec, and the smaller uplinks with the
# downlinks that could reach 32x (the uplink alone is 1/16 of the baseline at 2 bits). With
# `frozen` the align round still sends fp32 gradients (~60 % of what is left), hence
# `lowrank4+frozen`. (`rdfsq1+ans` was measured once, seed 0: ANS makes 1-bit codes no
# smaller, 6,488 vs 6,485 B per sample, so it is not in the grid.)
PAIRS: tuple[tuple[str, str], ...] = (
    BASELINE, ("rdfsq2", "fp32"), ("rdfsq2", "bf16"), ("rdfsq2", "sr4"), ("rdfsq2", "sr2"), ("rdfsq2", "lowrank4"),
    ("rdfsq2", "frozen"), ("rdfsq2+ans", "frozen"), ("rdfsq1", "frozen"),
    ("rdfsq2+ans", "lowrank4+frozen"), ("rdfsq1", "lowrank4+frozen"), ("rdfsq2", "lowrank4+frozen"),
    ("fp16", "lowrank4+frozen"),  # the downlink's share of the cost, without the uplink quantiser's
)
QUICK_PAIRS = (BASELINE, ("rdfsq2", "frozen"))
QUICK: dict[str, object] = {  # a few steps of the default job (the shipped checkpoint, both stages)
    "num-server-rounds": 2, "align-rounds": 1, "local-steps": 2, "steps-per-exchange": 1, "batch-size": 4,
    "align-batch-size": 4, "num-samples": 120, "warmup-steps": 1,
}
PINNED = {"checkpoint": False}  # no checkpoint files; everything else is the default job
# The codec keys a pair leaves unset, at the values they had when the study was made (before
# its result became the default): applied to every run, not part of its key.
CODEC_BASE: dict[str, object] = {"entropy-coding": "none", "grad-compressor": "none", "client-finetune": "train"}

COLUMNS = (
    "key", "up", "down", "seed", "clients", "acc", "acc_per_round", "samples",
    "up_bytes", "down_bytes", "grad_bytes", "weight_bytes", "eval_bytes",
    *(f"net_s_{bw}mbps" for bw in BANDWIDTHS_MBPS), "compute_s", "train_s", "wall_s",
)


@dataclass(frozen=True)
class TrafficSpec:
    """One run: an (uplink, downlink) pair at a seed, with its complete run-config overrides."""

    up: str
    down: str
    seed: int
    clients: int
    overrides: tuple[tuple[str, object], ...]
    base: tuple[tuple[str, object], ...] = tuple(CODEC_BASE.items())  # under the overrides, not hashed

    @property
    def label(self) -> str:
        return f"{self.up} / {self.down} seed={self.seed}"

    def config(self):
        from sim.config import SplitConfig

        return SplitConfig.from_run_config({**dict(self.base), **dict(self.overrides)})

    def key(self) -> str:
        """Hash of the overrides and client count (a row with this key is this run); validates the config."""
        self.config()
        blob = json.dumps({"overrides": dict(self.overrides), "clients": self.clients}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run(self) -> dict[str, object]:
        return run_pair(self)


def make_specs(pairs, seeds, clients: int, base: dict[str, object]) -> list[TrafficSpec]:
    """Seed-major, so that an interrupted study holds whole seeds of the grid."""
    return [TrafficSpec(up, down, s, clients, tuple(sorted({**base, **UPLINK[up], **DOWNLINK[down], "seed": s}.items())))
            for s in seeds for up, down in pairs]


def run_pair(spec: TrafficSpec) -> dict[str, object]:
    """Train one pair with the reference trainer (one torch thread) and measure its ledger."""
    import torch

    from sim.training.reference import run_reference
    from sim.wire.ledger import NetworkModel, network_seconds_per_round
    from sim.wire.messages import EVALUATE

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = spec.config()
    res = run_reference(cfg, spec.clients)
    rows = res.ledger.rows
    totals = res.ledger.totals()
    # the downlink's gradients: what train requests carry beyond a round's first request (weights + config)
    grad_bytes = sum(r.payload_bytes for r in rows if r.direction == "down" and r.kind == "train.split_step" and r.exchange > 0)
    weight_bytes = sum(r.payload_bytes for r in rows if r.kind == "train.split_step"
                       and ((r.direction == "down" and r.exchange == 0) or (r.direction == "up" and r.samples == 0)))
    rounds = [rep.round for rep in res.reports]
    computes = [rep.compute_s for rep in res.reports]
    row: dict[str, object] = {
        "key": spec.key(), "up": spec.up, "down": spec.down, "seed": spec.seed, "clients": spec.clients,
        "acc": res.accuracy[-1] if res.accuracy else math.nan,
        "acc_per_round": ";".join(f"{a:.4f}" for a in res.accuracy), "samples": res.samples,
        "up_bytes": totals["uplink_bytes"], "down_bytes": totals["downlink_bytes"], "grad_bytes": grad_bytes,
        "weight_bytes": weight_bytes,
        "eval_bytes": sum(r.wire_bytes for r in rows if r.kind == EVALUATE),
        "compute_s": ";".join(f"{c:.3f}" for c in computes),
        "train_s": round(res.train_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
    }
    for bw in BANDWIDTHS_MBPS:
        net = NetworkModel(float(bw), cfg.rtt_ms)
        per_round = network_seconds_per_round(rows, net)
        row[f"net_s_{bw}mbps"] = ";".join(f"{per_round.get(r, 0.0):.4f}" for r in [0, *rounds])
    return row


# ------------------------------------------------------------------ report
def _floats(cell) -> list[float]:
    return [float(x) for x in str(cell).split(";") if x != ""]


def time_to(row: pd.Series, bw: int, target: float) -> float:
    """Simulated seconds until the run's accuracy first reaches ``target`` (NaN if never)."""
    net = _floats(row[f"net_s_{bw}mbps"])
    clock = round_end_clock(net[0], _floats(row["compute_s"]), net[1:])
    return next((t for acc, t in zip(_floats(row["acc_per_round"]), clock) if acc >= target), math.nan)


def summarise(df: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """One row per pair: accuracy, paired difference to the baseline, bytes per sample and
    the ratio to the baseline's, time to the target accuracy; and that target."""
    df = df.assign(total=df.up_bytes + df.down_bytes)
    df = df.assign(per_sample=df.total / df.samples, up_per_sample=df.up_bytes / df.samples,
                   down_per_sample=df.down_bytes / df.samples, grad_per_sample=df.grad_bytes / df.samples,
                   weight_per_sample=df.weight_bytes / df.samples, eval_per_sample=df.eval_bytes / df.samples)
    base = df[(df.up == BASELINE[0]) & (df.down == BASELINE[1])].set_index("seed")
    target = TARGET_FRACTION * float(base.acc.mean()) if len(base) else math.nan
    base_bytes = float(base.per_sample.mean()) if len(base) else math.nan
    out = []
    for (up, down), g in df.groupby(["up", "down"], sort=False):
        m, s, n = mean_std(g.acc)
        paired = [float(r.acc - base.acc[r.seed]) for r in g.itertuples() if r.seed in base.index]
        dm, ds, dn = mean_std(paired)
        row = {"up": up, "down": down, "seeds": n, "acc_mean": m, "acc_std": s, "diff_mean": dm,
               "diff_se": ds / math.sqrt(dn) if dn > 1 else math.nan, "paired_seeds": dn,
               "bytes_per_sample": float(g.per_sample.mean()), "up_per_sample": float(g.up_per_sample.mean()),
               "down_per_sample": float(g.down_per_sample.mean()), "grad_per_sample": float(g.grad_per_sample.mean()),
               "weight_per_sample": float(g.weight_per_sample.mean()), "eval_per_sample": float(g.eval_per_sample.mean()),
               "ratio": base_bytes / float(g.per_sample.mean())}
        for bw in BANDWIDTHS_MBPS:  # the whole run's network time: bytes only, deterministic
            row[f"net_{bw}mbps"] = float(np.mean([sum(_floats(r[f"net_s_{bw}mbps"])) for _, r in g.iterrows()]))
        row["compute_s"] = float(np.mean([sum(_floats(r["compute_s"])) for _, r in g.iterrows()]))
        for bw in BANDWIDTHS_MBPS:  # the mean over seeds, when every seed gets there
            times = [time_to(r, bw, target) for _, r in g.iterrows()]
            row[f"tta_{bw}mbps"] = float(np.mean(times)) if not any(math.isnan(t) for t in times) else math.nan
        out.append(row)
    return pd.DataFrame(out), target


def best_within(summary: pd.DataFrame, points: float) -> pd.Series | None:
    """The pair with the highest traffic ratio whose mean paired accuracy cost is at most ``points``."""
    ok = summary[(summary.diff_mean >= -points / 100 - 1e-9) & summary.diff_mean.notna()]  # 1e-9: float noise
    return None if ok.empty else ok.sort_values("ratio", ascending=False).iloc[0]


def pareto_plot(summary: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in summary.itertuples():
        ax.errorbar(r.bytes_per_sample, 100 * r.acc_mean, yerr=100 * (r.acc_std if r.acc_std == r.acc_std else 0),
                    fmt="o", capsize=3)
        ax.annotate(f"{r.up} / {r.down}", (r.bytes_per_sample, 100 * r.acc_mean), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front, best = [], -1.0
    for r in summary.sort_values("bytes_per_sample").itertuples():
        if r.acc_mean > best:
            front.append((r.bytes_per_sample, 100 * r.acc_mean))
            best = r.acc_mean
    if front:
        ax.step(*zip(*front), where="post", color="grey", lw=1, label="Pareto frontier")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("total bytes per training sample (up + down, weights and evaluation included)")
    ax.set_ylabel("exact match (%)")
    ax.set_title("Uplink codec / downlink codec: accuracy vs total traffic")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(df: pd.DataFrame, out: Path, command: str, clients: int, errors: list[str], loads: str) -> pd.DataFrame:
    summary, target = summarise(df)
    summary.to_csv(out / "traffic_summary.csv", index=False)
    pareto_plot(summary, out / "traffic.png")
    lines = [
        "# Both directions: accuracy against total traffic per training sample",
        "",
        f"Command: `{command}`  ",
        f"The default job (split fine-tuning of `checkpoints/tiny-vlm` on pathology, stage both), {clients} clients, "
        f"in-process reference trainer, one torch thread per run. {loads}",
        "",
        "Bytes: every message of the run in both directions as Flower serialises it (codes, text, gradients, weights "
        "down and up, codec initialisation, every round's evaluation), divided by the training samples. "
        f"Accuracy: exact match after the last round; Δ: paired by seed against `{BASELINE[0]} / {BASELINE[1]}` "
        "(mean ± s.e.). Time to accuracy: simulated seconds (measured compute + the ledger's bytes on a symmetric "
        f"link, 30 ms round trip unless the config says otherwise) to reach {TARGET_FRACTION:.0%} of the baseline's "
        f"mean final accuracy ({100 * target:.1f} %), the mean over seeds; – = not reached by every seed. "
        "Network: the whole run's simulated network seconds (the ledger's bytes only: deterministic); compute: "
        "the measured training and evaluation seconds of the run (mean over seeds), which other jobs on this "
        "2-core machine inflate (per-run wall times in `traffic.csv`), so the TTA columns are noisier than the "
        "network ones.",
        "",
        "| uplink | downlink | seeds | exact match % | Δ vs baseline (pt) | bytes / sample | up | down | of it gradients "
        "| ratio | " + " | ".join(f"network {bw} Mbit/s (s)" for bw in BANDWIDTHS_MBPS) + " | compute (s) | "
        + " | ".join(f"TTA {bw} Mbit/s (s)" for bw in BANDWIDTHS_MBPS) + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * 2 * len(BANDWIDTHS_MBPS),
    ]
    for r in summary.itertuples():
        diff = "–" if r.diff_mean != r.diff_mean else (
            f"{100 * r.diff_mean:+.2f}" + (f" ± {100 * r.diff_se:.2f}" if r.diff_se == r.diff_se else ""))
        acc = f"{100 * r.acc_mean:.1f}" + (f" ± {100 * r.acc_std:.1f}" if r.acc_std == r.acc_std else "")
        net = " | ".join(f"{getattr(r, f'net_{bw}mbps'):,.1f}" for bw in BANDWIDTHS_MBPS)
        tta = " | ".join("–" if (v := getattr(r, f"tta_{bw}mbps")) != v else f"{v:,.1f}" for bw in BANDWIDTHS_MBPS)
        lines.append(f"| {r.up} | {r.down} | {r.seeds} | {acc} | {diff} | {table_cell(r.bytes_per_sample)} | "
                     f"{table_cell(r.up_per_sample)} | {table_cell(r.down_per_sample)} | {table_cell(r.grad_per_sample)} | "
                     f"{r.ratio:.1f}× | {net} | {r.compute_s:,.1f} | {tta} |")
    lines.append("")
    for pts in (1, 3):
        b = best_within(summary, pts)
        lines.append(f"- Best ratio at ≤ {pts} point{'s' if pts > 1 else ''} of paired accuracy cost: " + (
            "none" if b is None else f"**{b.ratio:.1f}×** (`{b.up} / {b.down}`, Δ {100 * b.diff_mean:+.2f} pt, "
            f"{table_cell(b.bytes_per_sample)} B per sample)"))
    top = summary.sort_values("ratio").iloc[-1]
    rest = top.bytes_per_sample - top.grad_per_sample - top.weight_per_sample - top.eval_per_sample
    base_bytes = top.bytes_per_sample * top.ratio
    lines.append(f"- Where the bytes of the smallest pair (`{top.up} / {top.down}`, {table_cell(top.bytes_per_sample)} B per "
                 f"sample) go: evaluation {table_cell(top.eval_per_sample)} B, client weights down and up "
                 f"{table_cell(top.weight_per_sample)} B, gradients {table_cell(top.grad_per_sample)} B, the rest (training "
                 f"codes, token ids, Flower's framing) {table_cell(rest)} B. {TARGET_RATIO:.0f}× below the baseline is "
                 f"{table_cell(base_bytes / TARGET_RATIO)} B per sample.")
    if errors:
        lines += ["", "Failed runs (no row; a rerun retries them):", "", *[f"- {e}" for e in errors]]
    lines += ["", "Per run: `traffic.csv`; per pair: `traffic_summary.csv`; plot: `traffic.png`.", ""]
    (out / "traffic.md").write_text("\n".join(lines))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.traffic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--pairs", nargs="+", metavar="UP/DOWN", help="a subset of the grid, e.g. rdfsq2/frozen")
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, one torch thread each)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="a few steps of two pairs (CI); accuracies mean nothing")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the CSV")
    ap.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    out = args.out or (Path("runs/quick") if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    try:
        extra = parse_overrides(args.config)
        pairs = [tuple(p.split("/", 1)) for p in args.pairs] if args.pairs else list(QUICK_PAIRS if args.quick else PAIRS)
        unknown = [f"{u}/{d}" for u, d in pairs if u not in UPLINK or d not in DOWNLINK]
        if unknown:
            raise ValueError(f"unknown pair(s) {unknown}; uplinks {list(UPLINK)}, downlinks {list(DOWNLINK)}")
        seeds = args.seeds or ([0, 1] if args.quick else list(SEEDS))
        specs = make_specs(pairs, seeds, args.clients, {**PINNED, **(QUICK if args.quick else {}), **extra})
        for s in specs:
            s.key()  # validates every config before anything runs
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    csv_path = out / "traffic.csv"
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--report-only", "-v", "--verbose")]
    command = " ".join(["python -m experiments.traffic", *shown])
    errors: list[str] = []
    if not args.report_only:
        t0, load0 = time.time(), os.getloadavg()[0]
        errors = run_grid(specs, csv_path, args.jobs, columns=COLUMNS)
        add_table_row(out / "traffic_invocations.csv", {
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)), "wall_s": round(time.time() - t0, 1),
            "jobs": args.jobs, "argv": " ".join(shown), "load_1m_at_start": round(load0, 2),
            "load_1m_at_end": round(os.getloadavg()[0], 2)})
    if not csv_path.exists():
        print(f"error: no results in {csv_path}", file=sys.stderr)
        return 1
    df = pd.read_csv(csv_path, dtype={"key": str})
    df = df[df.key.isin({s.key() for s in specs})]
    if df.empty:
        print(f"error: {csv_path} holds no run of this grid", file=sys.stderr)
        return 1
    inv = out / "traffic_invocations.csv"
    loads = ""
    if inv.exists():
        t = pd.read_csv(inv)
        loads = (f"Invocations: {len(t)}, {t.wall_s.sum() / 60:.0f} min of wall time in all, --jobs "
                 f"{'/'.join(str(j) for j in t.jobs.unique())}; 1-minute load average at their starts "
                 f"{'/'.join(str(v) for v in t.load_1m_at_start)}.")
    write_report(df, out, command, args.clients, errors, loads)
    print(f"wrote {out / 'traffic.md'} ({len(df)} runs)")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
