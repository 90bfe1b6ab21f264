"""Command line::

    python -m sim run [--clients N] [--out DIR] [-c KEY=VALUE ...]    a simulation
    python -m sim run --resume DIR                                  continue an interrupted one
    python -m sim deploy [--supernodes N] --out DIR [-c KEY=VALUE ...] [--insecure]

``run`` drives the Flower app in-process with ``flwr.simulation.run_simulation`` on
the Ray backend. The config (and a LLaVA JSON dataset) is validated before anything
starts; Ray is limited to this machine (:func:`ray_backend_config`). ``deploy`` runs
the same app on Flower's deployment runtime on loopback (``sim/deploy.py``): a TLS
SuperLink with SuperNode authentication, one SuperNode per hospital, ``flwr run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, SplitConfig
from .data.types import DataError
from .results import resolve_run_dir


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def ray_backend_config(cfg: SplitConfig, address: str | None = None) -> dict:
    """Ray sized for the machine it runs on (measured on a 2-core, 24 GB box; docs/reliability.md).

    * ``num_cpus`` = the machine's cores and ``client_resources.num_cpus`` =
      ``client-cpus`` (1): Flower's Ray backend starts ``cores / client-cpus`` actors, so
      2 ClientApps compute at once here however many clients are simulated; the other
      nodes' messages wait in the queue and their state lives in the driver's contexts.
    * ``object_store_memory`` = 512 MB instead of Ray's default of 30 % of RAM: only the
      in-flight messages and contexts pass through it (a few MB per client message with
      the default model), and the rest of the memory stays for the processes.
    * no dashboard, no GPUs, Ray's own logs at ERROR.

    With ``address`` (``--ray-address``, e.g. ``auto``) the simulation joins a running Ray
    cluster instead (docs/performance.md); the cluster's own CPU and memory settings apply.
    """
    cpus = os.cpu_count() or 1
    if address:
        return {
            "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
            "init_args": {"address": address, "logging_level": logging.ERROR, "log_to_driver": True},
        }
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


def _resume_config(run_dir: Path, args: argparse.Namespace) -> SplitConfig:
    """The config of an interrupted run (``DIR/config.json``); nothing may be overridden."""
    if args.config or args.out:
        raise ConfigError("--resume takes the run's own config.json; drop -c/--out")
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there")
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"--resume {run_dir}: no checkpoint.pt (the run stopped before its first round ended, "
                          "or ran with checkpoint=false)")
    cfg = SplitConfig.from_run_config(json.loads(path.read_text()))
    if args.clients is not None and args.clients != cfg.expected_clients:
        raise ConfigError(f"--clients {args.clients} differs from the run's {cfg.expected_clients}")
    return cfg


def _check_local_data(cfg: SplitConfig) -> None:
    """Load a LLaVA JSON dataset before starting, so a bad file or record stops the run
    with an error naming it (``on-bad-record=error``) instead of failing every client."""
    if cfg.dataset == "llava-json" and cfg.data_path:
        from .data import load_examples

        load_examples(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record)


def run(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = Path(args.resume).expanduser().resolve()
        cfg = _resume_config(run_dir, args)
        clients = cfg.expected_clients
    else:
        overrides = parse_overrides(args.config or [])
        if args.out:
            overrides["out-dir"] = str(Path(args.out).expanduser().resolve().parent)
            overrides["run-name"] = Path(args.out).name
        clients = 4 if args.clients is None else args.clients
        if clients < 1:
            raise ConfigError("--clients must be >= 1")
        overrides.setdefault("expected-clients", str(clients))
        cfg = SplitConfig.from_run_config(overrides)
        run_dir = resolve_run_dir(cfg)
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} already holds a finished run; pick another --out")
    _check_local_data(cfg)

    # Imported late: flwr and torch take seconds to import, and config errors come first.
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server_app.server_app import make_server_app

    run_simulation(
        server_app=make_server_app(cfg, run_dir, resume=bool(args.resume)),
        client_app=client_app,
        num_supernodes=clients,
        backend_config=ray_backend_config(cfg, args.ray_address),
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
    p.add_argument("--clients", type=int, default=None, help="number of simulated hospitals (SuperNodes; default 4)")
    p.add_argument("--out", help="run directory (default: out-dir/<time>-<compressor>-b<bits>)")
    p.add_argument("-c", "--config", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run from DIR/checkpoint.pt")
    p.add_argument("--ray-address", help="join a running Ray cluster (e.g. 'auto') instead of starting a local Ray")
    d = sub.add_parser("deploy", help="run on Flower's deployment runtime on this machine (SuperLink + SuperNodes)")
    d.add_argument("--supernodes", type=int, default=3, help="number of SuperNodes (one per hospital)")
    d.add_argument("--out", required=True, help="run directory (the deployment's certificates and logs go beside it)")
    d.add_argument("-c", "--config", action="append", metavar="KEY=VALUE", help="override a config key")
    d.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    args = parser.parse_args(argv)
    try:
        return run(args) if args.command == "run" else deploy(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def deploy(args: argparse.Namespace) -> int:
    """``python -m sim deploy``: :class:`sim.deploy.LocalDeployment` and one ``flwr run``."""
    from .deploy import LocalDeployment

    out = Path(args.out).expanduser().resolve()
    overrides = parse_overrides(args.config or [])
    overrides |= {"out-dir": str(out.parent), "run-name": out.name, "expected-clients": str(args.supernodes)}
    cfg = SplitConfig.from_run_config(overrides)
    if (out / "summary.json").exists():
        raise ConfigError(f"{out} already holds a finished run; pick another --out")
    work = out.parent / f"{out.name}-deployment"
    with LocalDeployment(work, args.supernodes, tls=not args.insecure, authenticate=not args.insecure) as dep:
        outcome = dep.run(cfg.to_run_config())
    print(outcome.output[-4000:])
    if not outcome.ok:
        print(f"deployment run failed: status {outcome.status!r}; logs in {work / 'logs'}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads((out / "summary.json").read_text()), indent=2))
    return 0
