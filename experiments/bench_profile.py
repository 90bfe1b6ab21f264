"""Profile a short split-learning run with py-spy and report where the time goes.

``py-spy record --subprocesses --format raw`` samples the driver (ServerApp: LLM steps,
serialisation, Flower's engine) and the Ray workers (ClientApps) of one
``python -m sim run``. The collapsed stacks are reduced to the share of samples whose
innermost *project* or *library* frame is each function (self time, idle waits
excluded), so the table names the concrete costs of an exchange.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_sim import cli_overrides

IDLE = re.compile(r"\b(wait|_wait_for_tstate_lock|select|poll|epoll_wait|sleep|acquire|get_objects|_recv|recv)\b")
FRAME = re.compile(r"^(?P<fn>[^ ]+) \((?P<file>[^:]+):?\d*\)$")


def _label(frame: str) -> tuple[str, str]:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return m["fn"], path


def top_costs(collapsed: str, top: int) -> list[dict]:
    """Busy samples by innermost frame ``function (module)``, as shares of all busy samples."""
    busy: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        fn, path = _label(frames[-1])
        if IDLE.search(fn) or fn.startswith("process "):  # idle waits; py-spy's process-only frames
            continue
        n = int(count)
        total += n
        busy[f"{fn} ({path})"] += n
    return [
        {"figure": "profile", "setting": name, "value": 100.0 * n / total, "unit": "% of busy samples"}
        for name, n in busy.most_common(top)
    ] if total else []


PROFILE_TIMEOUT_S = 900  # py-spy waits for every process it follows; Ray can leave one behind


RUN_END_GRACE_S = 10.0  # after the run's summary.json appears, py-spy gets this long to end on its own


def _wait_for_run(proc: subprocess.Popen, summary: Path, timeout_s: float) -> str:
    """Wait for py-spy to end; '' if it did, else why it must be interrupted: the run
    finished (its summary.json is written) but py-spy still waits for a leftover process
    after :data:`RUN_END_GRACE_S`, or ``timeout_s`` passed."""
    deadline, finished_at = time.monotonic() + timeout_s, None
    while proc.poll() is None:
        now = time.monotonic()
        if now > deadline:
            return f"timed out after {timeout_s:.0f} s"
        if finished_at is None and summary.exists():
            finished_at = now
        if finished_at is not None and now - finished_at > RUN_END_GRACE_S:
            return "the run finished but py-spy kept waiting for a leftover process"
        time.sleep(0.5)
    return ""


def profile_exchange(config: dict, clients: int, top: int = 12, rate: int = 100,
                     timeout_s: float = PROFILE_TIMEOUT_S) -> list[dict]:
    """Run ``python -m sim run`` under py-spy; the top self-time functions (busy samples).

    py-spy follows the run's subprocesses and waits for all of them; a Ray helper process
    that outlives the run (seen once: the dashboard agent, re-parented to init) keeps it
    waiting, so after ``timeout_s`` it is interrupted (SIGINT: it writes what it sampled)."""
    # py-spy is a console script of the dev extras: on PATH, or beside this interpreter
    # when the venv is used without being activated (``.venv/bin/python -m ...``).
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return [{"figure": "profile", "setting": "py-spy is not installed (pip install py-spy)", "value": float("nan"),
                 "unit": ""}]
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        out = Path(tmp) / "stacks.txt"
        cmd = [py_spy, "record", "--subprocesses", "--format", "raw", "--rate", str(rate), "-o", str(out), "--",
               sys.executable, "-m", "sim", "run", "--clients", str(clients), "--out", str(Path(tmp) / "run"),
               *cli_overrides(config)]
        log = Path(tmp) / "stderr.txt"  # a file, not a pipe: nobody reads a pipe while we poll
        with log.open("w") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
            stopped = _wait_for_run(proc, Path(tmp) / "run" / "summary.json", timeout_s)
            if stopped:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        err = log.read_text(errors="replace")
        err = f"{stopped}; {err}" if stopped else err
        if (proc.returncode != 0 and not stopped) or not out.exists() or not out.read_text().strip():
            return [{"figure": "profile", "setting": f"py-spy failed: {err.strip()[-200:]}",
                     "value": float("nan"), "unit": ""}]
        return top_costs(out.read_text(), top)
