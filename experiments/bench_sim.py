"""Benchmarks that run the split-learning system: P1 (protocol efficiency) and P5 (scale).

Every simulation is a real ``python -m sim run`` in a subprocess (Flower's simulation
engine on Ray), so the measurement includes everything a user's run pays; a sampler
thread records the peak RSS summed over the whole process tree (driver, raylet, Ray
workers). The numbers come from the run directory the command writes:

* ``metrics.csv`` ``train_s`` per round (exchanges + server steps + FedAvg, no
  evaluation), split into ``runtime_s`` (Flower's messaging cost: each exchange's wait
  minus the slowest client's own handler time) and ``client_compute_s``;
* ``summary.json``: samples and bytes.

P1 divides the simulation's training throughput (samples/s) by that of the in-process
reference trainer (:func:`sim.training.reference.run_reference`: the same round engine with
the clients called in process instead of through Flower's runtime) on the same config. The reference runs in a subprocess too, so both sides get
a fresh interpreter and the same torch thread defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

from sim.training.timing import COMPONENTS

BREAKDOWN = tuple("t_" + c.removesuffix("_s") for c in COMPONENTS)  # they sum to the exchange's wait
TRAIN = "train.split_step"

REFERENCE_SNIPPET = """
import json, sys
from sim.config import SplitConfig
from sim.training.reference import run_reference
cfg = SplitConfig.from_run_config(json.loads(sys.argv[1]))
res = run_reference(cfg, int(sys.argv[2]), evaluate_rounds=False)
print(json.dumps({"samples": res.samples, "train_s": res.train_s}))
"""


class PeakRSS:
    """Samples the summed RSS of a process and all its descendants every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cli_overrides(config: dict) -> list[str]:
    """``-c KEY=VALUE`` arguments of ``python -m sim run`` for ``config``."""
    out = []
    for k, v in config.items():
        out += ["-c", f"{k}={v}"]
    return out


def exchange_breakdown(run_dir: Path) -> dict:
    """Where a training exchange's time went, from ``run_dir``'s ``timing.csv``
    (sim/training/timing.py): the mean over the training exchanges of each component of
    the exchange's last reply (:data:`BREAKDOWN`, summing to its wait), the mean wait
    ``exchange_s``, and ``t_server``, the ServerApp's own work per exchange outside the
    wait (building, validating and decoding messages, the LLM steps, FedAvg: ``train_s``
    minus the waits). NaN without training exchanges."""
    timing = pd.read_csv(run_dir / "timing.csv")
    train_s = float(pd.read_csv(run_dir / "metrics.csv")["train_s"].sum())
    last = timing[(timing["kind"] == TRAIN) & timing["last"].astype(bool)]
    n = len(last)
    nan = float("nan")
    out = {"exchanges": n, "exchange_s": float(last["exchange_s"].mean()) if n else nan}
    out |= {name: float(last[col].mean()) if n else nan for col, name in zip(COMPONENTS, BREAKDOWN)}
    out["t_server"] = (train_s - float(last["exchange_s"].sum())) / n if n else nan
    return out


class SimulationTimeout(RuntimeError):
    """A ``python -m sim run`` stopped at its time limit: how far it got (from the ledger
    it appends to as it goes) and the peak RSS until then."""

    def __init__(self, cmd: list[str], timeout: float, peak_rss_gb: float, progress: str) -> None:
        super().__init__(f"stopped after {timeout:.0f} s ({' '.join(cmd)}): {progress}")
        self.timeout, self.peak_rss_gb, self.progress = timeout, peak_rss_gb, progress


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants (the Ray processes of a simulation)."""
    try:
        procs = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.communicate()


def run_progress(run_dir: Path, clients: int) -> str:
    """How far an unfinished run got: the ``query.hello`` replies in its ledger and the
    rounds in its metrics."""
    hellos = rounds = 0
    if (run_dir / "ledger.csv").is_file():
        ledger = pd.read_csv(run_dir / "ledger.csv")
        hellos = int(((ledger["kind"] == "query.hello") & (ledger["direction"] == "up")).sum())
    if (run_dir / "metrics.csv").is_file():
        rounds = len(pd.read_csv(run_dir / "metrics.csv"))
    return f"{hellos} of {clients} query.hello replies received, {rounds} rounds finished"


def run_simulation(config: dict, clients: int, workdir: Path, timeout: float = 1800) -> dict:
    """One ``python -m sim run``; returns its training throughput, timings and peak RSS.
    Past ``timeout`` s the run is killed and :class:`SimulationTimeout` says how far it got."""
    out = workdir / f"sim-{len(list(workdir.iterdir()))}"
    cmd = [sys.executable, "-m", "sim", "run", "--clients", str(clients), "--out", str(out), *cli_overrides(config)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid) as rss:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_tree(proc)
            raise SimulationTimeout(cmd, timeout, rss.peak / 1e9, run_progress(out, clients)) from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not (out / "summary.json").exists():
        raise RuntimeError(f"simulation failed ({' '.join(cmd)}):\n{err[-3000:]}")
    metrics = pd.read_csv(out / "metrics.csv")
    summary = json.loads((out / "summary.json").read_text())
    train_s = float(metrics["train_s"].sum())
    return {
        "samples": int(metrics["samples"].sum()),
        "train_s": train_s,
        "samples_per_s": float(metrics["samples"].sum()) / train_s,
        "runtime_s": float(metrics["runtime_s"].sum()),
        "client_compute_s": float(metrics["client_compute_s"].sum()),
        "exchanges": int(metrics["exchanges"].sum()),
        "round_wall_s": float(metrics["wall_s"].median()),
        "first_round_wall_s": float(metrics["wall_s"].iloc[0]),  # with the discovery (query.hello)
        "round_train_s": float(metrics["train_s"].median()),
        "uplink_bytes_per_round": float(metrics["uplink_bytes"].median()),
        "wall_s": wall,
        "peak_rss_gb": rss.peak / 1e9,
        "uplink_bytes": summary["uplink_bytes"],
        "breakdown": {k: v for k, v in exchange_breakdown(out).items() if k != "exchanges"},
    }


def run_reference(config: dict, clients: int, timeout: float = 1800) -> dict:
    """The in-process reference trainer on the same config, in a fresh interpreter."""
    cmd = [sys.executable, "-c", REFERENCE_SNIPPET, json.dumps(config), str(clients)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["samples_per_s"] = out["samples"] / out["train_s"]
    return out


def p1_protocol_efficiency(base: dict, clients: int, repeats: int, label: str) -> list[dict]:
    """Simulation ÷ reference throughput for one config, ``repeats`` times each."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-p1-") as tmp:
        for r in range(repeats):
            sim = run_simulation(base, clients, Path(tmp))
            ref = run_reference(base, clients)
            rows.append({
                "figure": "P1", "setting": label, "repeat": r, "value": sim["samples_per_s"] / ref["samples_per_s"],
                "unit": "sim/reference", "sim_samples_per_s": sim["samples_per_s"],
                "ref_samples_per_s": ref["samples_per_s"], "runtime_s_per_exchange": sim["runtime_s"] / sim["exchanges"],
                "clients": clients, "steps_per_exchange": base.get("steps-per-exchange"), **sim["breakdown"],
            })
    return rows


def p5_scale(base: dict, total_clients: int, sampled: int, label: str, timeout: float = 1800) -> dict:
    """One run with ``total_clients`` SuperNodes of which ``sampled`` train and evaluate per
    round. A run that does not finish in ``timeout`` s is a row too: its peak RSS until it
    was stopped, and in ``stopped`` how far it got."""
    frac = sampled / total_clients
    config = {**base, "fraction-train": frac, "fraction-evaluate": frac}
    with tempfile.TemporaryDirectory(prefix="bench-p5-") as tmp:
        try:
            sim = run_simulation(config, total_clients, Path(tmp), timeout=timeout)
        except SimulationTimeout as err:
            return {"figure": "P5", "setting": label, "value": err.peak_rss_gb, "unit": "peak RSS GB",
                    "clients": total_clients, "sampled": sampled, "wall_s": err.timeout,
                    "stopped": f"not finished in {err.timeout:.0f} s: {err.progress}"}
    return {
        "figure": "P5", "setting": label, "value": sim["peak_rss_gb"], "unit": "peak RSS GB",
        "clients": total_clients, "sampled": sampled, "round_wall_s": sim["round_wall_s"],
        "first_round_wall_s": sim["first_round_wall_s"],
        "round_train_s": sim["round_train_s"], "runtime_s_per_exchange": sim["runtime_s"] / sim["exchanges"],
        "client_compute_s": sim["client_compute_s"], "uplink_bytes_per_round": sim["uplink_bytes_per_round"],
        "wall_s": sim["wall_s"],
    }
