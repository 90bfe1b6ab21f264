"""``python -m experiments.spine_recipe --clients 4 [--set KEY=VALUE ...] [--out CSV]``

Trains one config with the in-process reference trainer (:func:`sim.reference.run_reference`:
the Flower strategy's exact schedule and step functions, no messaging) and appends its
per-round exact-match accuracy to a CSV. It is how the spine's learning recipe (learning
rate, schedule, steps per exchange, ...) was chosen; docs/results-spine.md lists the
variants tried. The reference trainer reproduces the Flower simulation step for step
(tests/test_simulation.py), so a recipe found here behaves the same under ``python -m sim run``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from sim.cli import parse_overrides
from sim.config import SplitConfig
from sim.reference import run_reference


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.spine_recipe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default="experiments/results/spine/recipe.csv")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    cfg = SplitConfig.from_run_config(overrides)
    t0 = time.perf_counter()
    res = run_reference(cfg, args.clients)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["overrides", "clients", "final_accuracy", "accuracy_per_round", "wall_s"])
        w.writerow([" ".join(args.set) or "(defaults)", args.clients, f"{res.accuracy[-1]:.4f}",
                    " ".join(f"{a:.3f}" for a in res.accuracy), f"{wall:.0f}"])
    print(f"{' '.join(args.set) or '(defaults)'}: final accuracy {res.accuracy[-1]:.3f} "
          f"(per round {[round(a, 3) for a in res.accuracy]}), {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
