"""The server's side of a run: the LLM side, the ledger, the results, the checkpoints.

:class:`ServerRun` prepares a run directory and takes the round engine's reports. The
ServerApp (``server_app/server_app.py``: ``flwr run``, deployment and ``python -m sim
run``) drives the engine through the SplitFed strategy over Flower's ``Grid``;
:func:`run_in_process` (``python -m sim run --in-process``) drives the same engine over
the in-process transport (:mod:`sim.training.transport`). Both write the same files.

After every round the run directory gets an atomic ``checkpoint.pt``
(:mod:`sim.run.checkpoint`); the run-config key ``resume`` restores the server, ledger,
run files and RNGs from it and continues with the next round. Every runtime resumes
through that key: ``python -m sim run --resume``, ``python -m sim deploy --resume`` and a
plain ``flwr run --run-config 'resume=true ...'`` (docs/reliability.md, docs/deployment.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import astuple
from pathlib import Path

import torch

from sim.config import SETTINGS, ConfigError, SplitConfig
from sim.data.tokenizer import get_tokenizer
from sim.training.engine import RoundEngine, RoundReport
from sim.training.server import build_server, initial_client_weights
from sim.training.timing import TimingLog
from sim.training.transport import InProcessTransport, client_threads
from sim.wire.ledger import Ledger, LedgerRow, NetworkModel

from .checkpoint import Checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .progress import RoundTable
from .results import RunRecorder

log = logging.getLogger(__name__)

class ServerRun:
    """One run directory, as the server writes it (docs/architecture.md lists its files).

    ``cfg.resume`` restores the server, ledger, run files, counters and RNGs from
    ``run_dir/checkpoint.pt`` and continues with the next round. Give the engine
    ``on_round``, ``first_round`` and ``resumed_from``; :meth:`attach` it; start from
    ``weights``; :meth:`finish` when it has run."""

    def __init__(self, cfg: SplitConfig, run_dir: Path) -> None:
        # the clients derive their checkpoint directory from out-dir/run-name, so they must be
        # resolved; `resume` is an instruction to this server, not part of the run, so the run's
        # files, its checkpoints and the config sent to the clients say false, as an uninterrupted run's
        resume = cfg.resume
        self.cfg = cfg = cfg.replace(out_dir=str(run_dir.parent), run_name=run_dir.name, resume=False)
        self.run_dir = run_dir
        self.ckpt = load_checkpoint(run_dir) if resume else None
        if self.ckpt is not None:
            _check_same_config(run_dir, self.ckpt.config, cfg.to_run_config())
        torch.manual_seed(cfg.seed)
        self.server = build_server(cfg)
        self.recorder = RunRecorder(run_dir, cfg, clients=cfg.expected_clients)
        get_tokenizer(cfg).save_pretrained(run_dir / "tokenizer")
        self.ledger = Ledger(NetworkModel.from_config(cfg), run_dir / "ledger.csv")
        self.timing = TimingLog(run_dir / "timing.csv")
        self.table = RoundTable(cfg)
        self.first_round = self.ckpt.round + 1 if self.ckpt else 1
        self.resumed_from = self.ckpt.round if self.ckpt else 0
        self.engine: RoundEngine | None = None
        self.weights = initial_client_weights(cfg)

    def attach(self, engine: RoundEngine) -> None:
        """The engine that runs the rounds (restored from the checkpoint when resuming); its
        replies' timing goes to ``timing.csv``."""
        self.engine = engine
        engine.timing = self.timing
        if self.ckpt is not None:
            self.weights = self._restore(self.ckpt)
            log.info("resuming %s after round %d", self.run_dir, self.ckpt.round)

    def on_round(self, report: RoundReport) -> None:
        self.table.add(self.recorder.round(report, self.ledger))
        if self.cfg.checkpoint:
            save_checkpoint(self.run_dir, self._checkpoint(report.round))

    def finish(self) -> dict:
        """Write summary.json and the plots; returns the summary."""
        engine = self.engine
        self.recorder.clients = len(engine.partitions)
        extra = {
            "run_dir": str(self.run_dir), "rejected_messages": engine.rejected_total, "dropped_clients": engine.dropped_total,
            "bad_records": {str(p): n for p, n in sorted(engine.bad_records.items()) if n},  # skipped, per partition
            "resumed_from": self.resumed_from,
        }
        summary = self.recorder.finish(self.ledger, extra)
        log.info("run finished: accuracy %.3f, results in %s", summary["accuracy"], self.run_dir)
        return summary

    def _checkpoint(self, rnd: int) -> Checkpoint:
        server, engine, recorder = self.server, self.engine, self.recorder
        return Checkpoint(
            round=rnd, config=self.cfg.to_run_config(), server_model=server.model.state_dict(),
            server_optimiser=server.opt.state_dict(), client_weights=engine.global_weights,
            rng=rng_state(), ledger=[astuple(r) for r in self.ledger.rows], sim_network_s=self.ledger.sim_network_s,
            metrics_csv=(recorder.dir / "metrics.csv").read_text(), steps_csv=(recorder.dir / "steps.csv").read_text(),
            strategy=engine.state_dict(), elapsed_s=time.perf_counter() - recorder.t0,
            sim_uplink_s=self.ledger.sim_uplink_s, sim_downlink_s=self.ledger.sim_downlink_s,
        )

    def _restore(self, ckpt: Checkpoint) -> dict:
        """Put the server, ledger, run files and RNGs back as they were after ``ckpt.round``;
        returns the global client weights."""
        self.server.model.load_state_dict(ckpt.server_model)
        self.server.opt.load_state_dict(ckpt.server_optimiser)
        self.ledger.restore([LedgerRow(*r) for r in ckpt.ledger], ckpt.sim_network_s, ckpt.sim_uplink_s,
                            ckpt.sim_downlink_s)
        (self.run_dir / "metrics.csv").write_text(ckpt.metrics_csv)
        (self.run_dir / "steps.csv").write_text(ckpt.steps_csv)
        self.recorder.t0 -= ckpt.elapsed_s
        self.engine.load_state_dict(ckpt.strategy)
        set_rng_state(ckpt.rng)
        return ckpt.client_weights


def _check_same_config(run_dir: Path, saved: dict, now: dict) -> None:
    """A resume must use the checkpoint's config (keys declared since it was written count
    as their defaults)."""
    saved = {k: s.default for k, s in SETTINGS.items()} | saved
    changed = sorted(k for k, v in now.items() if saved.get(k) != v)
    if changed:
        raise ConfigError(f"cannot resume {run_dir}: the config differs from the checkpoint's in {changed}")


def run_in_process(cfg: SplitConfig, run_dir: Path, clients: int) -> dict:
    """``python -m sim run --in-process``: the run, with the clients in this process
    (``cfg.resume``: continue from ``run_dir/checkpoint.pt``)."""
    run = ServerRun(cfg, run_dir)
    engine = RoundEngine(run.cfg, run.server, run.ledger, on_round=run.on_round, first_round=run.first_round,
                         resumed_from=run.resumed_from)
    run.attach(engine)
    with run.table:
        engine.run(InProcessTransport(clients, threads=client_threads(run.cfg.client_cpus)), run.weights,
                   run.cfg.num_server_rounds, run.cfg.exchange_timeout_s)
    return run.finish()
