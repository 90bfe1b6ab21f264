"""End to end through Flower's Ray simulation, checked against the reference trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sim.config import SplitConfig
from sim.reference import run_reference

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "num-server-rounds": 2, "local-steps": 3, "steps-per-exchange": 2, "batch-size": 4, "num-samples": 160,
    "hidden-size": 32, "image-size": 16, "patch-size": 4,
}


def run_cli(out: Path, clients: int, overrides: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sim", "run", "--clients", str(clients), "--out", str(out)]
    for k, v in overrides.items():
        cmd += ["-c", f"{k}={v}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = run_cli(out, 2, SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_run_directory_is_complete(sim_run):
    for name in ("config.json", "metrics.csv", "ledger.csv", "steps.csv", "summary.json", "accuracy.png", "bytes.png"):
        assert (sim_run / name).is_file(), name
    summary = json.loads((sim_run / "summary.json").read_text())
    for key in ("accuracy", "rounds", "clients", "compressor", "bits", "uplink_bytes", "downlink_bytes",
                "uplink_bytes_per_sample", "samples_seen", "wall_s", "sim_network_s"):
        assert key in summary, key
    assert summary["rounds"] == 2 and summary["clients"] == 2


def test_ledger_adds_up_to_the_summary(sim_run):
    summary = json.loads((sim_run / "summary.json").read_text())
    ledger = pd.read_csv(sim_run / "ledger.csv")
    assert ledger.loc[ledger.direction == "up", "wire_bytes"].sum() == summary["uplink_bytes"]
    assert ledger.loc[ledger.direction == "down", "wire_bytes"].sum() == summary["downlink_bytes"]
    assert (ledger.wire_bytes > ledger.payload_bytes).all()
    # every exchange has a request and a reply per client: 1 hello + 2 rounds x (3 train + 1 eval)
    assert len(ledger) == 2 * 2 * (1 + 2 * (3 + 1))


def test_simulation_reproduces_the_reference_trainer(sim_run):
    cfg = SplitConfig.from_run_config(SMALL)
    ref = run_reference(cfg, num_partitions=2)
    steps = pd.read_csv(sim_run / "steps.csv")
    assert len(steps) == len(ref.step_losses) == 2 * 3
    assert max(abs(a - b) for a, b in zip(steps["loss"], ref.step_losses)) <= 1e-5
    metrics = pd.read_csv(sim_run / "metrics.csv")
    assert list(metrics["accuracy"]) == pytest.approx(ref.accuracy, abs=1e-9)


def test_invalid_config_fails_before_anything_starts(tmp_path):
    proc = run_cli(tmp_path / "bad", 2, {"compressor": "zip"})
    assert proc.returncode == 2
    assert "compressor" in proc.stderr and "rdfsq" in proc.stderr
    assert not (tmp_path / "bad").exists()
