"""How long this process took to start: stdlib only, so that the light ClientApp path
(:mod:`sim.training.site_worker`) can time itself without importing torch.

:mod:`sim.training.timing` describes the parts (``start``, ``load``) and how they are read
from ``/proc``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

CLIENTAPP_COMMAND = "flwr-clientapp"  # the process flwr 1.41 starts for every message (SubprocessExecutor)


def process_start(first_line: float) -> tuple[float, float]:
    """``(start, load)`` of this process up to ``first_line`` (epoch seconds); all of it is
    ``start`` when Flower's thread is not found, and both are 0 without ``/proc``."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)  # /proc start times count from boot
        created = boot + _start_ticks("/proc/self/stat") / tick
        main = threading.main_thread().native_id
        threads = [t.native_id for t in threading.enumerate() if t.native_id not in (None, main)]
        started = [boot + _start_ticks(f"/proc/self/task/{tid}/stat") / tick for tid in threads]
    except (OSError, AttributeError, ValueError):
        return 0.0, 0.0
    flwr_up = min((s for s in started if created <= s <= first_line), default=first_line)
    return flwr_up - created, first_line - flwr_up


def _start_ticks(stat_path: str) -> int:
    """Field 22 of ``/proc/<pid>[/task/<tid>]/stat``: the start time in clock ticks since boot."""
    text = Path(stat_path).read_text()
    return int(text[text.rindex(")") + 2:].split()[19])
