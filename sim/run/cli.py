"""Command line::

    python -m sim run [--clients N] [--out DIR] [-c KEY=VALUE ...]    a simulation
    python -m sim run --in-process ...                              the same run without Flower's runtime
    python -m sim run --resume DIR                                  continue an interrupted one
    python -m sim deploy [--supernodes N] --out DIR [-c KEY=VALUE ...] [--insecure]
    python -m sim deploy --resume DIR [--insecure]                  continue an interrupted deployment run
    python -m sim worker --socket PATH                              a site's warm worker for its SuperNode
    python -m sim pretrain --out DIR [--quick] [--set KEY=VALUE ...] centralised pretraining -> a checkpoint for init=DIR
    python -m sim codecs                                            the registered codecs
    python -m sim docs [--write | --check]                          the generated config tables

``run`` drives the Flower app with ``flwr.simulation.run_simulation`` on the Ray
backend; ``--in-process`` runs the same round engine with the clients called in this
process (the reference trainer; same files, same losses). The config (and a LLaVA JSON
dataset) is validated before anything starts; Ray is sized for this machine
(:func:`ray_backend_config`), or joins a running cluster with ``--ray-address``
(docs/performance.md, "A real Ray cluster"; ``tests/test_ray_cluster.py``). ``deploy`` runs the same app on Flower's deployment
runtime on loopback (:mod:`sim.run.deploy`): a TLS SuperLink with SuperNode
authentication, one SuperNode per hospital, ``flwr run``. Both ``--resume`` options
read the run's ``config.json`` and set run-config key ``resume``, which the ServerApp
reads whichever runtime started it.

The Flower components are loaded by name, as ``flwr run`` loads the ones
``pyproject.toml`` names (:data:`CLIENT_APP`, :data:`SERVER_APP_MODULE`): the apps
depend on ``sim``, not the other way round.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from sim.config import ConfigError, SplitConfig
from sim.data.types import DataError

from .results import resolve_run_dir

CLIENT_APP = "clients.client_app:app"  # = [tool.flwr.app.components] clientapp
SERVER_APP_MODULE = "server_app.server_app"  # the serverapp component's module (its make_server_app)


def load_component(ref: str):
    """``module:attribute`` -> the object (a Flower component reference)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def ray_backend_config(cfg: SplitConfig, address: str | None = None, gpus: int | None = None) -> dict:
    """Ray sized for the machine it runs on (measured on a 2-core, 24 GB box; docs/reliability.md).

    * ``num_cpus`` = the machine's cores and ``client_resources.num_cpus`` =
      ``client-cpus`` (1): Flower's Ray backend starts ``cores / client-cpus`` actors, so
      2 ClientApps compute at once here however many clients are simulated; the other
      nodes' messages wait in the queue and their state lives in the driver's contexts.
    * ``object_store_memory`` = 512 MB instead of Ray's default of 30 % of RAM: only the
      in-flight messages and contexts pass through it (a few MB per client message with
      the default model), and the rest of the memory stays for the processes.
    * ``client_resources.num_gpus`` = ``client-gpus`` (0: Ray hides the GPUs from the
      ClientApps) and, when it is above 0, ``num_gpus`` = the GPUs torch sees here (``gpus``);
      no dashboard, Ray's own logs at ERROR.

    With ``address`` (``--ray-address``, e.g. ``auto``) the simulation joins a running Ray
    cluster instead (docs/performance.md); the cluster's own CPU, GPU and memory settings apply.
    A ClientApp ``device`` of ``cuda``/``cuda:N`` needs ``client-gpus`` > 0 (Ray would hide
    the GPUs from it), and ``client-gpus`` > 0 on a local Ray needs a GPU here.
    """
    cpus = os.cpu_count() or 1
    if cfg.client_gpus == 0 and cfg.device.startswith("cuda"):
        raise ConfigError(f"Config key 'device' is {cfg.device!r} but 'client-gpus' is 0: Ray hides the GPUs from "
                          "ClientApps that ask for none; set client-gpus (e.g. 0.25 to share a GPU by 4) or device=auto.")
    if address:
        return {
            "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
            "init_args": {"address": address, "logging_level": logging.ERROR, "log_to_driver": True},
        }
    if cfg.client_gpus > 0 and gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if cfg.client_gpus > 0 and not gpus:
        raise ConfigError(f"Config key 'client-gpus' is {cfg.client_gpus} but this machine has no GPU torch can use.")
    return {
        "client_resources": {"num_cpus": min(cfg.client_cpus, cpus), "num_gpus": cfg.client_gpus},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": gpus if cfg.client_gpus > 0 else 0,
            "object_store_memory": 512 * 1024 * 1024,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": True,
        },
    }


def _resume_config(run_dir: Path, args: argparse.Namespace, clients: int | None) -> SplitConfig:
    """The config of an interrupted run (``DIR/config.json``) with ``resume`` set; nothing
    may be overridden, and ``clients`` (if given) must be the run's."""
    if args.config or args.out:
        raise ConfigError("--resume takes the run's own config.json; drop -c/--out")
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there")
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"--resume {run_dir}: no checkpoint.pt (the run stopped before its first round ended, "
                          "or ran with checkpoint=false)")
    cfg = SplitConfig.from_run_config(json.loads(path.read_text()) | {"resume": True})
    if clients is not None and clients != cfg.expected_clients:
        raise ConfigError(f"--clients/--supernodes {clients} differs from the run's expected-clients "
                          f"({cfg.expected_clients})")
    return cfg


def _check_local_data(cfg: SplitConfig) -> None:
    """Load a LLaVA JSON dataset and the tower's image processor before starting, so a bad
    file or record (``on-bad-record=error``) or a tower saved without its processor stops
    the run with an error naming it instead of failing every client."""
    if cfg.vision_tower_source != "tiny":
        from sim.model.processor import image_processor

        try:
            image_processor(cfg)
        except ValueError as err:
            raise ConfigError(f"Config key 'vision-tower': {err}") from None
    if cfg.dataset == "llava-json" and cfg.data_path:
        from sim.data import load_examples

        load_examples(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record,
            cfg.data_allow_outside_paths)


def run(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = Path(args.resume).expanduser().resolve()
        cfg = _resume_config(run_dir, args, args.clients)
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
    if args.in_process:
        from .server_main import run_in_process

        run_in_process(cfg, run_dir, clients)
    else:
        from flwr.simulation import run_simulation

        run_simulation(
            server_app=load_component(f"{SERVER_APP_MODULE}:make_server_app")(cfg, run_dir),
            client_app=load_component(CLIENT_APP),
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
    from sim.config.tables import help_text

    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a split-learning simulation", epilog=help_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=None, help="number of simulated hospitals (SuperNodes; default 4)")
    p.add_argument("--out", help="run directory (default: out-dir/<time>-<compressor>-b<bits>)")
    p.add_argument("-c", "--config", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run from DIR/checkpoint.pt")
    p.add_argument("--ray-address", help="join a running Ray cluster (e.g. 'auto') instead of starting a local Ray")
    p.add_argument("--in-process", action="store_true",
                   help="run the clients in this process instead of Flower's simulation runtime (the reference trainer)")
    d = sub.add_parser("deploy", help="run on Flower's deployment runtime on this machine (SuperLink + SuperNodes)")
    d.add_argument("--supernodes", type=int, default=None, help="number of SuperNodes (one per hospital; default 3)")
    where = d.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="run directory (the deployment's certificates and logs go beside it)")
    where.add_argument("--resume", metavar="DIR", help="continue an interrupted deployment run from DIR/checkpoint.pt "
                                                       "(the SuperNodes' optimiser state from their state-dir)")
    d.add_argument("-c", "--config", action="append", metavar="KEY=VALUE", help="override a config key")
    d.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    d.add_argument("--no-site-workers", action="store_true",
                   help="no warm worker beside each SuperNode: every message pays Flower's process start, imports and "
                        "model rebuild (docs/deployment.md)")
    w = sub.add_parser("worker", help="a site's warm worker: handles its SuperNode's messages in one long-lived "
                                      "process over a Unix socket (SuperNode --node-config worker-socket=PATH)")
    w.add_argument("--socket", required=True, help="the Unix socket path (its directory: yours, not writable by others)")
    w.add_argument("--idle-timeout-s", type=float, default=3600.0, help="stop after this long without a message")
    w.add_argument("--watch-pid", type=int, default=0, help="stop when this process (e.g. the SuperNode) exits")
    w.add_argument("--ready-file", type=Path, help="touched once the worker listens")
    w.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as a ClientApp process)")
    t = sub.add_parser("pretrain", help="centralised pretraining of the tiny VLM on the public corpus -> a checkpoint "
                                        "directory for init=DIR (docs/foundation.md)")
    t.add_argument("--out", required=True, help="checkpoint directory to write (must not hold a checkpoint yet)")
    t.add_argument("--quick", action="store_true", help="a tiny model on a tiny corpus in seconds (for tests)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe setting (sim/pretrain/recipe.py)")
    t.add_argument("--verify", action="store_true", help="only check the files of --out against its manifest's sha256")
    sub.add_parser("codecs", help="the registered codecs: streams, bit ranges, integer codes")
    g = sub.add_parser("docs", help="the tables generated from the declared settings (pyproject.toml, README.md, "
                                    "docs/compressors.md)")
    g.add_argument("--write", action="store_true", help="rewrite the generated parts of those files")
    g.add_argument("--check", action="store_true", help="exit 1 if any of them is out of date")
    args = parser.parse_args(argv)
    commands = {"run": run, "deploy": deploy, "worker": worker, "pretrain": pretrain, "codecs": codecs, "docs": docs}
    try:
        return commands[args.command](args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def pretrain(args: argparse.Namespace) -> int:
    """``python -m sim pretrain``: :func:`sim.pretrain.train.pretrain` (or ``--verify`` a checkpoint)."""
    from sim.model.pretrained import MANIFEST_FILE, verify_checkpoint

    out = Path(args.out).expanduser()
    if args.verify:
        bad = verify_checkpoint(out)
        for line in bad:
            print(f"{out}: {line}", file=sys.stderr)
        print(f"{out}: {'intact' if not bad else f'{len(bad)} problems'}")
        return 1 if bad else 0
    if (out / MANIFEST_FILE).exists():
        raise ConfigError(f"{out} already holds a checkpoint; pick another --out")
    from sim.pretrain.recipe import QUICK, RECIPE
    from sim.pretrain.train import pretrain as run_pretraining

    recipe = (QUICK if args.quick else RECIPE).with_overrides(parse_overrides(args.set or []))
    command = ["python", "-m", "sim", "pretrain", "--out", args.out, *(["--quick"] if args.quick else [])]
    command += [f"--set {pair}" for pair in args.set or []]
    manifest = run_pretraining(recipe, out, command=command)
    print(json.dumps(manifest["final_metrics"], indent=2))
    return 0


def codecs(args: argparse.Namespace) -> int:
    from sim.config.tables import codecs_table

    print(codecs_table(), end="")
    return 0


def docs(args: argparse.Namespace) -> int:
    from sim.config.tables import generated_files, stale_files, write_files

    if args.write:
        for p in write_files():
            print(f"rewrote {p}")
        return 0
    stale = stale_files()
    for p in stale:
        print(f"out of date: {p} (run python -m sim docs --write)", file=sys.stderr)
    if not args.check:
        for p in generated_files():
            print(f"{p}: {'out of date' if p in stale else 'up to date'}")
    return 1 if stale else 0


def worker(args: argparse.Namespace) -> int:
    """``python -m sim worker``: :func:`sim.training.site_worker.serve`."""

    from sim.training.site_worker import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    return serve(args.socket, args.idle_timeout_s, args.watch_pid, args.ready_file, args.threads)


def deploy(args: argparse.Namespace) -> int:
    """``python -m sim deploy``: :class:`sim.run.deploy.LocalDeployment` and one ``flwr run``."""
    from .deploy import LocalDeployment

    if args.resume:
        out = Path(args.resume).expanduser().resolve()
        cfg = _resume_config(out, args, args.supernodes)
    else:
        out = Path(args.out).expanduser().resolve()
        overrides = parse_overrides(args.config or [])
        supernodes = 3 if args.supernodes is None else args.supernodes
        overrides |= {"out-dir": str(out.parent), "run-name": out.name, "expected-clients": str(supernodes)}
        cfg = SplitConfig.from_run_config(overrides)
    if cfg.init_dir is not None:  # the ClientApps run from the installed FAB, which holds no checkpoint
        cfg = cfg.replace(init=str(cfg.init_dir))
    if (out / "summary.json").exists():
        raise ConfigError(f"{out} already holds a finished run; pick another --out")
    work = out.parent / f"{out.name}-deployment"
    with LocalDeployment(work, cfg.expected_clients, tls=not args.insecure, authenticate=not args.insecure,
                         site_workers=not args.no_site_workers) as dep:
        outcome = dep.run(cfg.to_run_config())
    print(outcome.output[-4000:])
    if not outcome.ok:
        print(f"deployment run failed: status {outcome.status!r}; logs in {work / 'logs'}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads((out / "summary.json").read_text()), indent=2))
    return 0
