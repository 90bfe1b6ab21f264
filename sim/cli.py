"""Command line: ``python -m sim run [--clients N] [--out DIR] [-c KEY=VALUE ...]``.

Runs the Flower app in-process with ``flwr.simulation.run_simulation`` on the Ray
backend. The config is validated before anything starts; Ray is limited to this
machine's cores with ``client-cpus`` CPUs per simulated client.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, SplitConfig
from .results import resolve_run_dir


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def ray_backend_config(cfg: SplitConfig) -> dict:
    """Ray limited to this machine: all cores, ``client-cpus`` per client, small object store."""
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": min(cfg.client_cpus, cpus), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "object_store_memory": 512 * 1024 * 1024,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": True,
        },
    }


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.config or [])
    if args.out:
        overrides["out-dir"] = str(Path(args.out).expanduser().resolve().parent)
        overrides["run-name"] = Path(args.out).name
    if args.clients < 1:
        raise ConfigError("--clients must be >= 1")
    overrides.setdefault("expected-clients", str(args.clients))
    cfg = SplitConfig.from_run_config(overrides)
    run_dir = resolve_run_dir(cfg)
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} already holds a finished run; pick another --out")

    # Imported late: flwr and torch take seconds to import, and config errors come first.
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server_app.server_app import make_server_app

    run_simulation(
        server_app=make_server_app(cfg, run_dir),
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config=ray_backend_config(cfg),
    )
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        print(f"run failed: no summary in {run_dir}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads(summary_path.read_text()), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a split-learning simulation")
    p.add_argument("--clients", type=int, default=4, help="number of simulated hospitals (SuperNodes)")
    p.add_argument("--out", help="run directory (default: out-dir/<time>-<compressor>-b<bits>)")
    p.add_argument("-c", "--config", action="append", metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
