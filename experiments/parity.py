"""Is the reference the same run as the Flower simulation? Per-step losses of both, side by side.

``python -m experiments.parity [--clients 4] [-c KEY=VALUE ...] [--flower DIR] [--in-process DIR] [--rounds R]``::

    python -m sim run (Flower's Ray simulation)             --steps.csv-->  loss per step
    python -m sim run --in-process (clients with Ray's torch threads)  --steps.csv-->  loss per step
    the engine in process, clients with --other-threads torch threads           loss per step (rounds 1..R)
      --> experiments/results/parity.{csv,md}: |difference| per step, first step that differs

The simulation and the reference share every line of the round (``sim.training.engine``);
what is left to differ is the floating-point environment. Ray starts each simulated client
with ``OMP_NUM_THREADS = floor(client-cpus)``; the in-process transport gives its clients the
same count. The third column shows what a different count does (the earlier reference ran
its clients with the process's default, 2 threads here): the client's reductions split
differently, and the runs drift apart from the first client update on.

``--flower DIR`` and ``--in-process DIR`` reuse finished run directories of the same config
(otherwise both runs are made under the output folder); ``--quick`` is a smoke run on a
tiny config. Every config is the from-scratch regime (:data:`experiments.common.SCRATCH`)
under the ``-c`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from experiments.common import SCRATCH, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
QUICK = {"num-server-rounds": 2, "local-steps": 6, "steps-per-exchange": 3, "batch-size": 4, "num-samples": 160,
         "hidden-size": 32, "image-size": 16, "patch-size": 4, "checkpoint": False}


def run_losses(run_dir: Path, cfg) -> tuple[list[float], list[float]]:
    """Per-step losses and per-round accuracies of a finished run of config ``cfg``."""
    from sim.config import SplitConfig

    ran = SplitConfig.from_run_config(json.loads((run_dir / "config.json").read_text()))
    if ran.replace(out_dir=cfg.out_dir, run_name=cfg.run_name, expected_clients=0) != cfg.replace(expected_clients=0):
        raise SystemExit(f"error: {run_dir} was run with another config")
    return pd.read_csv(run_dir / "steps.csv")["loss"].tolist(), pd.read_csv(run_dir / "metrics.csv")["accuracy"].tolist()


def run_cli(overrides: dict, clients: int, run_dir: Path, *extra: str) -> Path:
    """``python -m sim run`` (with ``extra`` arguments, e.g. ``--in-process``) into ``run_dir``."""
    cmd = [sys.executable, "-m", "sim", "run", "--clients", str(clients), "--out", str(run_dir), *extra]
    for k, v in overrides.items():
        cmd += ["-c", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m sim run failed:\n{proc.stderr[-3000:]}")
    return run_dir


def in_process_losses(cfg, clients: int, rounds: int, threads: int) -> tuple[list[float], list[float]]:
    """Per-step losses and per-round accuracies of the first ``rounds`` rounds of the engine in process."""
    from sim.training.reference import reference_engine, reference_transport
    from sim.training.server import initial_client_weights

    losses, acc = [], []

    def on_round(report) -> None:
        losses.extend(report.step_losses)
        acc.append(report.accuracy)

    engine = reference_engine(cfg, on_round=on_round)
    with reference_transport(cfg, clients, threads) as transport:
        engine.run(transport, initial_client_weights(cfg), rounds, cfg.exchange_timeout_s)
    return losses, acc


def compare(flower: list[float], other: list[float]) -> dict:
    """Largest |difference| of the steps both have (``flower`` as written: 9 significant digits)."""
    n = min(len(flower), len(other))
    diffs = [abs(a - float(f"{b:.9g}")) for a, b in zip(flower[:n], other[:n])]
    first = next((i for i, d in enumerate(diffs) if d > 0), None)
    return {"steps": n, "max_abs_diff": max(diffs, default=0.0), "first_differing_step": first,
            "equal_steps": sum(d == 0 for d in diffs)}


def main(argv: list[str] | None = None) -> int:
    from sim.config import SplitConfig
    from sim.run.cli import parse_overrides
    from sim.training.transport import client_threads

    p = argparse.ArgumentParser(prog="python -m experiments.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--flower", type=Path, help="a finished python -m sim run directory of the same config")
    p.add_argument("--in-process", type=Path, help="a finished python -m sim run --in-process directory of it")
    p.add_argument("--rounds", type=int, help="rounds of the other-thread-count run (default: all)")
    p.add_argument("--other-threads", type=int, default=2, help="torch threads of the clients in the third run")
    p.add_argument("--quick", action="store_true", help="smoke run on a tiny config")
    p.add_argument("--out", type=Path, help="output folder (default experiments/results; runs/quick with --quick)")
    args = p.parse_args(argv)
    setup_logging()
    out = args.out or (ROOT / "runs" / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    asked = {**(QUICK if args.quick else {}), **parse_overrides(args.config)}
    overrides = {**SCRATCH, **asked}
    cfg = SplitConfig.from_run_config(overrides)
    t0, load0 = time.time(), os.getloadavg()[0]
    flower_dir = args.flower or run_cli(overrides, args.clients, out / "parity-flower-run")
    inproc_dir = args.in_process or run_cli(overrides, args.clients, out / "parity-in-process-run", "--in-process")
    flower, flower_acc = run_losses(flower_dir, cfg)
    losses, acc = run_losses(inproc_dir, cfg)
    same_threads = client_threads(cfg.client_cpus)
    rounds = args.rounds or cfg.num_server_rounds
    other, other_acc = in_process_losses(cfg, args.clients, rounds, args.other_threads)
    table = pd.DataFrame({"step": range(len(flower)), "flower": flower})
    table[f"in_process_threads_{same_threads}"] = pd.Series(losses)
    table[f"in_process_threads_{args.other_threads}"] = pd.Series(other)
    table.to_csv(out / "parity.csv", index=False)
    same, diff = compare(flower, losses), compare(flower, other)
    wall = time.time() - t0
    command = " ".join(["python -m experiments.parity", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Parity: the Flower simulation and the in-process reference", "",
        f"`{command}` — {wall:.0f} s on {os.cpu_count()} CPUs, 1-minute load {load0:.2f} at the start. "
        f"Runs: `{flower_dir}` (Flower), `{inproc_dir}` (in process); {args.clients} clients; config overrides: "
        f"`{' '.join(f'{k}={v}' for k, v in asked.items()) or 'none'}` on the from-scratch regime "
        f"(`{' '.join(f'{k}={v}' for k, v in SCRATCH.items())}`).", "",
        "| run | client torch threads | steps compared | steps with the same loss | largest \\|Δ loss\\| "
        "| first step that differs | accuracy per round |",
        "|---|---|---|---|---|---|---|",
        f"| Flower simulation (`python -m sim run`) | {same_threads} (Ray: floor(client-cpus)) | {len(flower)} | – | – | – | "
        f"{', '.join(f'{a:.3f}' for a in flower_acc)} |",
        f"| in process (`python -m sim run --in-process`), Ray's thread count | {same_threads} | {same['steps']} | {same['equal_steps']} | "
        f"{same['max_abs_diff']:.3g} | {same['first_differing_step'] if same['first_differing_step'] is not None else 'none'} | "
        f"{', '.join(f'{a:.3f}' for a in acc)} |",
        f"| in process, another thread count (rounds 1-{rounds}) | {args.other_threads} | {diff['steps']} | "
        f"{diff['equal_steps']} | {diff['max_abs_diff']:.3g} | "
        f"{diff['first_differing_step'] if diff['first_differing_step'] is not None else 'none'} | "
        f"{', '.join(f'{a:.3f}' for a in other_acc)} |", "",
        "Losses are compared as `steps.csv` writes them (9 significant digits). Step `s` of round `r` is "
        "`(r - 1) * local-steps + s`; the first client update is applied at the second exchange, so the "
        "steps before it see identical client weights in every run.",
    ]
    (out / "parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same["max_abs_diff"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
