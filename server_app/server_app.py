"""ServerApp: builds the LLM side, the ledger and the SplitFed strategy, runs the rounds
and writes the run directory.

``app`` is the component named in ``pyproject.toml`` (used by ``flwr run``); it reads
the config from ``context.run_config``. :func:`make_server_app` builds the same app
around an already validated config for ``python -m sim run``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from sim.config import SplitConfig
from sim.ledger import Ledger, NetworkModel
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


def run_server(grid: Grid, cfg: SplitConfig, run_dir: Path) -> dict:
    """Train for ``num-server-rounds`` and write ``run_dir``; returns summary.json's content."""
    if hasattr(grid, "pull_interval"):  # the simulation's InMemoryGrid
        grid.pull_interval = min(grid.pull_interval, SIM_PULL_INTERVAL_S)
    torch.manual_seed(cfg.seed)
    server = build_server(cfg)
    recorder = RunRecorder(run_dir, cfg, clients=cfg.expected_clients)
    get_tokenizer(cfg).save_pretrained(run_dir / "tokenizer")
    ledger = Ledger(NetworkModel(cfg.bandwidth_mbps, cfg.rtt_ms), run_dir / "ledger.csv")
    table = RoundTable(cfg)

    def on_round(report) -> None:
        table.add(recorder.round(report, ledger))

    strategy = SplitFedStrategy(cfg, server, ledger, on_round=on_round)
    with table:
        strategy.start(
            grid,
            ArrayRecord.from_torch_state_dict(initial_client_weights(cfg)),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.exchange_timeout_s,
        )
    recorder.clients = len(strategy.partitions)
    summary = recorder.finish(ledger, {"run_dir": str(run_dir)})
    log.info("run finished: accuracy %.3f, results in %s", summary["accuracy"], run_dir)
    return summary


def make_server_app(cfg: SplitConfig, run_dir: Path) -> ServerApp:
    """A ServerApp bound to a validated config (the simulation runner's entry)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run_dir)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run`` entry: config from ``[tool.flwr.app.config]`` + ``--run-config``."""
    cfg = SplitConfig.from_run_config(context.run_config)
    run_server(grid, cfg, resolve_run_dir(cfg))
