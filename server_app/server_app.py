"""ServerApp: builds the LLM side, the ledger and the SplitFed strategy, runs the rounds
and writes the run directory.

``app`` is the component named in ``pyproject.toml`` (used by ``flwr run``); it reads
the config from ``context.run_config``. :func:`make_server_app` builds the same app
around an already validated config for ``python -m sim run``.

After every round the run directory gets an atomic ``checkpoint.pt``
(``sim/checkpoint.py``); ``resume=True`` restores the server, ledger, run files and
RNGs from it and continues with the next round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import astuple
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from sim.checkpoint import Checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from sim.config import ConfigError, SplitConfig
from sim.ledger import Ledger, LedgerRow, NetworkModel
from sim.progress import RoundTable
from sim.results import RunRecorder, resolve_run_dir
from sim.server_ops import build_server, initial_client_weights
from sim.tokenizer import get_tokenizer
from strategies import SplitFedStrategy

log = logging.getLogger(__name__)

# The in-process simulation grid (``InMemoryGrid``) sleeps ``pull_interval`` (0.1 s by
# default) between polls for replies; every split exchange waits for one poll, so the
# default adds ~50 ms to each of the hundreds of exchanges of a run. Polling an
# in-memory store every 5 ms costs nothing measurable.
SIM_PULL_INTERVAL_S = 0.005


def run_server(grid: Grid, cfg: SplitConfig, run_dir: Path, resume: bool = False) -> dict:
    """Train for ``num-server-rounds`` and write ``run_dir``; returns summary.json's content.

    With ``checkpoint`` on, ``run_dir/checkpoint.pt`` is rewritten after every round;
    ``resume=True`` continues from it (``python -m sim run --resume DIR``)."""
    if hasattr(grid, "pull_interval"):  # the simulation's InMemoryGrid
        grid.pull_interval = min(grid.pull_interval, SIM_PULL_INTERVAL_S)
    # the clients derive their checkpoint directory from these, so they must be resolved
    cfg = cfg.replace(out_dir=str(run_dir.parent), run_name=run_dir.name)
    ckpt = load_checkpoint(run_dir) if resume else None
    if ckpt is not None and ckpt.config != cfg.to_run_config():
        changed = sorted(k for k, v in cfg.to_run_config().items() if ckpt.config.get(k) != v)
        raise ConfigError(f"cannot resume {run_dir}: the config differs from the checkpoint's in {changed}")
    torch.manual_seed(cfg.seed)
    server = build_server(cfg)
    recorder = RunRecorder(run_dir, cfg, clients=cfg.expected_clients)
    get_tokenizer(cfg).save_pretrained(run_dir / "tokenizer")
    ledger = Ledger(NetworkModel(cfg.bandwidth_mbps, cfg.rtt_ms), run_dir / "ledger.csv")
    table = RoundTable(cfg)

    def on_round(report) -> None:
        table.add(recorder.round(report, ledger))
        if cfg.checkpoint:
            save_checkpoint(run_dir, _checkpoint(report.round, cfg, server, strategy, ledger, recorder))

    strategy = SplitFedStrategy(
        cfg, server, ledger, on_round=on_round,
        first_round=ckpt.round + 1 if ckpt else 1, resumed_from=ckpt.round if ckpt else 0,
    )
    weights = initial_client_weights(cfg)
    if ckpt is not None:
        weights = _restore(ckpt, run_dir, server, strategy, ledger, recorder)
        log.info("resuming %s after round %d", run_dir, ckpt.round)
    with table:
        strategy.start(
            grid,
            ArrayRecord.from_torch_state_dict(weights),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.exchange_timeout_s,
        )
    recorder.clients = len(strategy.partitions)
    extra = {
        "run_dir": str(run_dir), "rejected_messages": strategy.rejected_total, "dropped_clients": strategy.dropped_total,
        "bad_records": {str(p): n for p, n in sorted(strategy.bad_records.items()) if n},  # skipped, per partition
        "resumed_from": ckpt.round if ckpt else 0,
    }
    summary = recorder.finish(ledger, extra)
    log.info("run finished: accuracy %.3f, results in %s", summary["accuracy"], run_dir)
    return summary


def _checkpoint(rnd: int, cfg: SplitConfig, server, strategy: SplitFedStrategy, ledger: Ledger, recorder: RunRecorder) -> Checkpoint:
    return Checkpoint(
        round=rnd, config=cfg.to_run_config(), server_model=server.model.state_dict(),
        server_optimiser=server.opt.state_dict(), client_weights=strategy.global_arrays.to_torch_state_dict(),
        rng=rng_state(), ledger=[astuple(r) for r in ledger.rows], sim_network_s=ledger.sim_network_s,
        metrics_csv=(recorder.dir / "metrics.csv").read_text(), steps_csv=(recorder.dir / "steps.csv").read_text(),
        strategy=strategy.state_dict(), elapsed_s=time.perf_counter() - recorder.t0,
    )


def _restore(ckpt: Checkpoint, run_dir: Path, server, strategy: SplitFedStrategy, ledger: Ledger, recorder: RunRecorder):
    """Put the server, ledger, run files and RNGs back as they were after ``ckpt.round``;
    returns the global client weights."""
    server.model.load_state_dict(ckpt.server_model)
    server.opt.load_state_dict(ckpt.server_optimiser)
    ledger.restore([LedgerRow(*r) for r in ckpt.ledger], ckpt.sim_network_s)
    (run_dir / "metrics.csv").write_text(ckpt.metrics_csv)
    (run_dir / "steps.csv").write_text(ckpt.steps_csv)
    recorder.t0 -= ckpt.elapsed_s
    strategy.load_state_dict(ckpt.strategy)
    set_rng_state(ckpt.rng)
    return ckpt.client_weights


def make_server_app(cfg: SplitConfig, run_dir: Path, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a validated config (the simulation runner's entry)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run_dir, resume=resume)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run`` entry: config from ``[tool.flwr.app.config]`` + ``--run-config``."""
    cfg = SplitConfig.from_run_config(context.run_config)
    run_server(grid, cfg, resolve_run_dir(cfg))
