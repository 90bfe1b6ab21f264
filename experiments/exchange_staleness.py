"""``python -m experiments.exchange_staleness [--seeds 0 1 2] [--spe 30 60] [-c KEY=VALUE ...] [--out DIR]``

What fewer, larger exchanges cost in accuracy. Within one exchange a client computes the
features of ``steps-per-exchange`` micro-batches with the client weights of the exchange's
start and applies their gradients one after another, so a larger value means staler
features in the rounds whose client half trains (docs/protocol.md, "Round structure", staleness); rounds whose
client half is frozen already run in one exchange with no such cost
(``frozen-steps-per-exchange``, bit-identical). In deployment every exchange pays
Flower's per-message cost (docs/deployment.md, "Tuning a real deployment"), so the
question is what one exchange per trained round loses against the default.

For each ``--spe`` value and seed it trains the run config (default: the default job,
fine-tuning the shipped checkpoint, 4 clients) with the in-process reference trainer
(:func:`sim.training.reference.run_reference`, whose per-step losses equal the Flower
simulation's) and records the final exact match and the exchanges the run made.
``runs.csv`` is appended as runs finish (a rerun skips the pairs it has); ``staleness.md``
compares every value with the first one, paired by seed (mean of the per-seed
differences ± their standard error).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd

from sim.config import SplitConfig
from sim.run.cli import parse_overrides
from sim.training.reference import run_reference

from .common import add_table_row, paired_by_seed, table_cell

CLIENTS = 4


def run_one(overrides: dict, spe: int, seed: int, clients: int) -> dict:
    cfg = SplitConfig.from_run_config({**overrides, "steps-per-exchange": spe, "seed": seed})
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = run_reference(cfg, clients)
    return {"steps_per_exchange": spe, "seed": seed, "final_accuracy": round(res.accuracy[-1], 4),
            "accuracy_per_round": " ".join(f"{a:.3f}" for a in res.accuracy),
            "exchanges": sum(r.exchanges for r in res.reports), "clients": clients,
            "wall_s": round(time.perf_counter() - t0), "load_1m_at_start": round(load, 2)}


def report(runs: pd.DataFrame, command: str) -> str:
    runs = runs.astype({"steps_per_exchange": int, "seed": int, "final_accuracy": float,
                        "exchanges": int})
    values = list(dict.fromkeys(runs["steps_per_exchange"]))
    base = runs[runs.steps_per_exchange == values[0]].set_index("seed")["final_accuracy"]
    lines = ["# Accuracy cost of fewer, larger exchanges", "", f"Command: `{command}`.", "",
             "| steps-per-exchange | seeds | exchanges per run | final exact match (mean) | "
             f"Δ vs {values[0]} (paired, pt) |", "|---|---|---|---|---|"]
    for v in values:
        g = runs[runs.steps_per_exchange == v]
        acc = g.set_index("seed")["final_accuracy"]
        mean, se, n = paired_by_seed(acc, base)
        delta = "–" if v == values[0] else f"{100 * mean:+.1f} ± {100 * se:.1f} (n={n})"
        lines.append(f"| {v} | {' '.join(map(str, sorted(g.seed)))} | {table_cell(g.exchanges.median())} | "
                     f"{acc.mean():.3f} | {delta} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.exchange_staleness",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--spe", type=int, nargs="+", default=[30, 60], help="steps-per-exchange values; the first is "
                    "the baseline")
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run-config key")
    ap.add_argument("--out", default="experiments/results/staleness")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.config)
    for key in ("steps-per-exchange", "seed"):
        if key in overrides:
            ap.error(f"'{key}' is what this experiment varies; use --spe / --seeds")
    SplitConfig.from_run_config(overrides)  # a bad key fails before any training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.csv"
    done = set()
    if path.exists():
        old = pd.read_csv(path)
        done = set(zip(old.steps_per_exchange.astype(int), old.seed.astype(int)))
    for seed in args.seeds:  # seed-major: an interrupted run still leaves complete pairs
        for spe in args.spe:
            if (spe, seed) in done:
                continue
            row = run_one(overrides, spe, seed, args.clients)
            add_table_row(path, row)
            print(f"steps-per-exchange {spe}, seed {seed}: {row['final_accuracy']:.3f} "
                  f"({row['exchanges']} exchanges, {row['wall_s']} s)", flush=True)
    runs = pd.read_csv(path)
    runs = runs[runs.steps_per_exchange.isin(args.spe) & runs.seed.isin(args.seeds)]
    runs = runs.set_index("steps_per_exchange").loc[args.spe].reset_index()  # baseline first
    command = "python -m experiments.exchange_staleness " + " ".join(
        ["--seeds", *map(str, args.seeds), "--spe", *map(str, args.spe), *[f"-c {c}" for c in args.config]])
    (out / "staleness.md").write_text(report(runs, command.strip()))
    print((out / "staleness.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
