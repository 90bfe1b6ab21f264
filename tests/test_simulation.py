"""End to end through Flower's Ray simulation, checked against the same round engine in process."""

import json

import pandas as pd
import pytest
import torch

from sim.config import SplitConfig
from sim.training.reference import run_reference
from sim.training.transport import InProcessTransport, client_threads

from conftest import SMALL, run_cli

def test_run_directory_is_complete(sim_run):
    for name in ("config.json", "metrics.csv", "ledger.csv", "steps.csv", "timing.csv", "summary.json", "accuracy.png",
                 "bytes.png"):
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
    # and every reply a timing row (sim/training/timing.py), the Ray workers' imports charged once each
    timing = pd.read_csv(sim_run / "timing.csv")
    assert len(timing) == (ledger.direction == "up").sum() and (timing[["start_s", "load_s"]] == 0).all().all()
    assert 0 < (timing["import_torch_s"] + timing["import_transformers_s"] + timing["import_project_s"] > 0).sum() <= 2


def test_in_process_run_is_the_same_run(sim_run, in_process_run):
    """``--in-process`` is the same engine without Flower's runtime: bitwise the same losses,
    the same accuracies, the same messages with the same information bytes."""
    assert (in_process_run / "steps.csv").read_bytes() == (sim_run / "steps.csv").read_bytes()
    a, b = pd.read_csv(sim_run / "metrics.csv"), pd.read_csv(in_process_run / "metrics.csv")
    assert a.accuracy.tolist() == b.accuracy.tolist() and a.samples.tolist() == b.samples.tolist()
    la, lb = pd.read_csv(sim_run / "ledger.csv"), pd.read_csv(in_process_run / "ledger.csv")
    cols = ["round", "exchange", "partition", "direction", "kind", "payload_bytes", "samples", "feature_bytes"]
    order = ["round", "exchange", "direction", "partition", "kind"]
    assert la[cols].sort_values(order).values.tolist() == lb[cols].sort_values(order).values.tolist()
    # wire bytes differ only by Flower's metadata (random run and node ids, the run name in the config)
    assert (la.sort_values(order).wire_bytes.values - lb.sort_values(order).wire_bytes.values).__abs__().max() < 64


def test_simulation_reproduces_the_reference_trainer(sim_run):
    cfg = SplitConfig.from_run_config(SMALL)
    ref = run_reference(cfg, num_partitions=2)
    steps = pd.read_csv(sim_run / "steps.csv")
    assert len(steps) == len(ref.step_losses) == 2 * 3
    assert steps["loss"].tolist() == [float(f"{x:.9g}") for x in ref.step_losses]
    metrics = pd.read_csv(sim_run / "metrics.csv")
    assert list(metrics["accuracy"]) == pytest.approx(ref.accuracy, abs=1e-9)


def test_in_process_clients_run_with_the_threads_ray_gives_them(monkeypatch):
    """The cause of the drift the reference used to show: Ray starts every simulated client
    with OMP_NUM_THREADS = floor(client-cpus), so its torch uses that many threads; the
    in-process transport runs its clients with the same count, whatever the caller's."""
    seen = []
    monkeypatch.setitem(__import__("sim.training.client_handlers", fromlist=["HANDLERS"]).HANDLERS, "query.hello",
                        lambda content, state, node: seen.append(torch.get_num_threads()) or content)
    from flwr.app import Message, RecordDict

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cpus, want in ((1.0, 1), (0.5, 1), (2.0, 2)):
            transport = InProcessTransport(1, threads=client_threads(cpus))
            transport.exchange([Message(RecordDict(), dst_node_id=1, message_type="query.hello")], 10.0)
            assert seen[-1] == want and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_invalid_config_fails_before_anything_starts(tmp_path):
    proc = run_cli(tmp_path / "bad", 2, {"compressor": "zip"})
    assert proc.returncode == 2
    assert "compressor" in proc.stderr and "rdfsq" in proc.stderr
    assert not (tmp_path / "bad").exists()
