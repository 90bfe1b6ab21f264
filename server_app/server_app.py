"""ServerApp: the SplitFed strategy over Flower's ``Grid``, writing a run directory.

``app`` is the component named in ``pyproject.toml`` (used by ``flwr run`` and the
deployment runtime); it reads the config from ``context.run_config``.
:func:`make_server_app` builds the same app around an already validated config for
``python -m sim run``. Both resume the same way: run-config key ``resume`` continues the
run in ``out-dir/run-name`` from its ``checkpoint.pt``. The run directory, results and
checkpoints are :class:`sim.run.server_main.ServerRun`'s; the rounds are the strategy's engine's.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sim.config import SplitConfig
from sim.run.results import resolve_run_dir
from sim.run.server_main import ServerRun
from sim.wire.arrays import state_record
from strategies import SplitFedStrategy

# The simulation's grid (``InMemoryGrid``) sleeps ``pull_interval`` (0.1 s by default)
# between polls for replies; every split exchange waits for one poll, so the default adds
# ~50 ms to each of the hundreds of exchanges of a run. Polling an in-memory store every
# 5 ms costs nothing measurable.
SIM_PULL_INTERVAL_S = 0.005


def run_server(grid: Grid, cfg: SplitConfig, run_dir: Path) -> dict:
    """Train for ``num-server-rounds`` and write ``run_dir``; returns summary.json's content
    (``cfg.resume``: continue from ``run_dir/checkpoint.pt``)."""
    if hasattr(grid, "pull_interval"):  # the simulation's InMemoryGrid
        grid.pull_interval = min(grid.pull_interval, SIM_PULL_INTERVAL_S)
    run = ServerRun(cfg, run_dir)
    strategy = SplitFedStrategy(run.cfg, run.server, run.ledger, on_round=run.on_round,
                                first_round=run.first_round, resumed_from=run.resumed_from)
    run.attach(strategy.engine)
    with run.table:
        strategy.start(grid, state_record(run.weights), num_rounds=run.cfg.num_server_rounds,
                       timeout=run.cfg.exchange_timeout_s)
    return run.finish()


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
    """``flwr run`` entry: config from ``[tool.flwr.app.config]`` + ``--run-config`` (with
    ``resume=true``, the run in ``out-dir/run-name`` continues from its checkpoint)."""
    cfg = SplitConfig.from_run_config(context.run_config)
    run_server(grid, cfg, resolve_run_dir(cfg))
