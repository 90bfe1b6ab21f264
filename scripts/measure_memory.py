"""Peak memory of a ``python -m sim run`` with many simulated clients.

Starts the run in its own process group (driver, Ray's GCS and raylet, the ClientApp
actors all belong to it) and samples every process of the group twice a second:

* ``pss``: proportional set size from ``/proc/<pid>/smaps_rollup`` (shared library
  pages split between the processes that map them, so the sum is not inflated);
* ``rss``: resident set size from ``/proc/<pid>/status`` (summing it over-counts
  shared pages: an upper bound);
* the machine's ``MemAvailable`` (its lowest value, and the drop from the start).

Usage::

    python scripts/measure_memory.py --clients 100 --out runs/mem100 -c num-server-rounds=1 -c stage=finetune ...

Writes ``memory.json`` into the run directory and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _kib(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def group_memory(pgid: int) -> tuple[int, int, int, dict[str, int]]:
    """(processes, summed PSS KiB, summed RSS KiB, PSS KiB by command name) of a process group."""
    n = pss = rss = 0
    by_name: dict[str, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
        except (OSError, ValueError, IndexError):
            continue
        p = _kib(d / "smaps_rollup", "Pss")
        n, pss, rss = n + 1, pss + p, rss + _kib(d / "status", "VmRSS")
        by_name[name] = by_name.get(name, 0) + p
    return n, pss, rss, by_name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--out", required=True)
    ap.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--interval", type=float, default=0.5)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    cmd = [sys.executable, "-m", "sim", "run", "--clients", str(args.clients), "--out", str(out)]
    cmd += [a for kv in args.config for a in ("-c", kv)]
    meminfo = Path("/proc/meminfo")
    avail0 = min_avail = _kib(meminfo, "MemAvailable")
    peak = {"pss_kib": 0, "rss_kib": 0, "processes": 0, "by_name_at_peak": {}}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        while proc.poll() is None:
            n, pss, rss, by_name = group_memory(proc.pid)
            if pss > peak["pss_kib"]:
                peak.update(pss_kib=pss, processes=n, by_name_at_peak=by_name)
            peak["rss_kib"] = max(peak["rss_kib"], rss)
            min_avail = min(min_avail, _kib(meminfo, "MemAvailable"))
            time.sleep(args.interval)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    report = {
        "clients": args.clients, "returncode": proc.returncode, "wall_s": round(time.monotonic() - t0, 1),
        "peak_pss_mib": round(peak["pss_kib"] / 1024, 1), "peak_rss_sum_mib": round(peak["rss_kib"] / 1024, 1),
        "processes_at_peak": peak["processes"],
        "pss_mib_by_process_at_peak": {k: round(v / 1024, 1) for k, v in sorted(peak["by_name_at_peak"].items())},
        "mem_available_start_mib": round(avail0 / 1024), "mem_available_min_mib": round(min_avail / 1024),
        "note": "MemAvailable is machine-wide: other processes on the machine move it too",
    }
    if out.is_dir():
        (out / "memory.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
