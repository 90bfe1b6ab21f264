"""``python -m experiments.spine_recipe --clients 4 [--set KEY=VALUE ...] [--out CSV]``

Trains one config of the from-scratch regime (:data:`experiments.common.SCRATCH` under the
``--set`` overrides) with the in-process reference trainer (:func:`sim.training.reference.run_reference`:
the Flower strategy's exact schedule and step functions, no messaging) and appends its
per-round exact-match accuracy to a CSV. It is how the spine's learning recipe (learning
rate, schedule, steps per exchange, ...) was chosen; docs/results-spine.md lists the
variants tried. The reference trainer reproduces the Flower simulation step for step
(tests/test_simulation.py), so a recipe found here behaves the same under ``python -m sim run``.

Each row also holds the final round's exact match per question type and, with
``--train-samples N`` (default 600), on the first N training examples of each client,
which tells over-fitting from under-fitting. ``--clients 1 --set batch-size=32 --set
steps-per-exchange=1 --set compressor=identity`` is the *unsplit* model: one vision
tower, one batch of 32 per step, no staleness, no FedAvg, features in fp16: an upper
bound for the split run at the same number of steps (experiments/results/spine/unsplit.csv).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from sim.config import SplitConfig
from sim.run.cli import parse_overrides
from sim.training.reference import evaluate_global, run_reference

from .common import SCRATCH, add_table_row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.spine_recipe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--train-samples", type=int, default=600,
                    help="also score the final model on this many training examples per client (0 = off)")
    ap.add_argument("--out", default="experiments/results/spine/recipe.csv")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    cfg = SplitConfig.from_run_config({**SCRATCH, **overrides})
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = run_reference(cfg, args.clients)
    wall = time.perf_counter() - t0
    row = {"overrides": " ".join(args.set) or "(from-scratch defaults)", "clients": args.clients,
           "final_accuracy": round(res.accuracy[-1], 4), "accuracy_per_round": " ".join(f"{a:.3f}" for a in res.accuracy)}
    row |= {f"acc_{q}": round(c / t, 4) for q, (c, t) in res.eval_counts.items() if q != "all" and t}
    if args.train_samples > 0:
        c, t = evaluate_global(cfg, res.server, res.client_weights, args.clients, cfg.num_server_rounds,
                               train_samples=args.train_samples)["all"]
        row["train_accuracy"] = round(c / t, 4)
    row |= {"wall_s": round(wall), "load_1m_at_start": round(load, 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    add_table_row(out, row)  # earlier rows stay (older files lack the newer columns)
    print(f"{row['overrides']}: final accuracy {res.accuracy[-1]:.3f} "
          f"(per round {[round(a, 3) for a in res.accuracy]}; train {row.get('train_accuracy', '-')}), {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
