"""A live per-round table in the terminal (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.table import Table

from sim.config import SplitConfig


class RoundTable:
    """Context manager showing one row per finished round."""

    def __init__(self, cfg: SplitConfig, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.rows: list[dict] = []
        self._live: Live | None = None

    def _render(self) -> Table:
        c = self.cfg
        t = Table(title=f"split learning: {c.compressor} b={c.bits}, {c.local_steps} steps/round", expand=False)
        for col in ("round", "accuracy", "train loss", "clients", "uplink", "downlink", "wall s", "net s"):
            t.add_column(col, justify="right")
        for r in self.rows:
            t.add_row(
                str(r["round"]), f"{100 * r['accuracy']:.1f}%", f"{r['train_loss']:.3f}",
                f"{r['clients']}" + (" (drop)" if r["dropped"] else ""),
                _mb(r["uplink_bytes"]), _mb(r["downlink_bytes"]), f"{r['wall_s']:.1f}", f"{r['sim_network_s']:.2f}",
            )
        return t

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
        else:  # not a terminal (CI, logs): one plain line per round
            self.console.print(
                f"round {row['round']}: accuracy {100 * row['accuracy']:.1f}%, loss {row['train_loss']:.3f}, "
                f"clients {row['clients']}, up {_mb(row['uplink_bytes'])}, down {_mb(row['downlink_bytes'])}, "
                f"{row['wall_s']:.1f} s"
            )

    def __enter__(self) -> RoundTable:
        if self.console.is_terminal:
            self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(*exc)
            self._live = None


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
