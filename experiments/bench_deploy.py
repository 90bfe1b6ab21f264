"""P1d: the deployment runtime's training throughput over the in-process reference's.

P1 (:mod:`experiments.bench_sim`) measures Flower's simulation engine; P1d measures the
runtime real sites use (docs/deployment.md): a TLS SuperLink with SuperNode
authentication and ``supernodes`` SuperNodes on loopback (:class:`sim.run.deploy.LocalDeployment`),
one ``flwr run`` per repeat, each followed by the in-process reference
(:func:`experiments.bench_sim.run_reference`) on the same config, so that both sides of
a ratio see the same machine load. One deployment serves every repeat of a setting.

Every row also carries the breakdown of a training exchange
(:func:`experiments.bench_sim.exchange_breakdown`, from the run directory's ``timing.csv``;
sim/training/timing.py, docs/performance.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from . import bench_sim
from .bench_sim import BREAKDOWN, exchange_breakdown


def run_deployment(dep, config: dict, out: Path, timeout: float = 3600) -> dict:
    """One ``flwr run`` on the running deployment ``dep``; its throughput and breakdown."""
    from sim.config import SplitConfig

    init_dir = SplitConfig.from_run_config(config).init_dir
    if init_dir is not None:  # the apps run from the installed FAB, which holds no checkpoint (as `sim deploy`)
        config = {**config, "init": str(init_dir)}
    outcome = dep.run({**config, "out-dir": str(out.parent), "run-name": out.name,
                       "expected-clients": dep.num_supernodes}, timeout_s=timeout)
    if not outcome.ok:
        raise RuntimeError(f"deployment run failed: {outcome.status}; logs in {dep.logs}\n{outcome.output[-3000:]}")
    metrics = pd.read_csv(out / "metrics.csv")
    train_s = float(metrics["train_s"].sum())
    return {"samples_per_s": float(metrics["samples"].sum()) / train_s, "train_s": train_s,
            "runtime_s": float(metrics["runtime_s"].sum()), **exchange_breakdown(out)}


def p1d_deployment_efficiency(config: dict, supernodes: int, repeats: int, label: str,
                              site_workers: bool = True) -> list[dict]:
    """Deployment ÷ reference throughput for one config, ``repeats`` times each, interleaved;
    with a warm worker beside each SuperNode (:mod:`sim.training.site_worker`) or without."""
    from sim.run.deploy import LocalDeployment

    rows = []
    with (tempfile.TemporaryDirectory(prefix="bench-p1d-") as tmp,
          LocalDeployment(Path(tmp) / "deployment", supernodes, tls=True, authenticate=True,
                          site_workers=site_workers) as dep):
        for r in range(repeats):
            d = run_deployment(dep, config, Path(tmp) / f"run-{r}")
            ref = bench_sim.run_reference(config, supernodes)
            rows.append({
                "figure": "P1d", "setting": label, "repeat": r, "value": d["samples_per_s"] / ref["samples_per_s"],
                "unit": "deployment/reference", "dep_samples_per_s": d["samples_per_s"],
                "ref_samples_per_s": ref["samples_per_s"], "clients": supernodes, "site_workers": site_workers,
                "steps_per_exchange": config.get("steps-per-exchange"),
                "runtime_s_per_exchange": d["runtime_s"] / d["exchanges"],
                **{k: d[k] for k in ("exchanges", "exchange_s", *BREAKDOWN, "t_server")},
            })
    return rows
